//! A fake Google Cloud Storage server: the subset of the XML API that object_store's GCS client
//! sends (object_store 0.14 `gcp/client.rs`), since no GCS emulator that works with object_store
//! can be installed here (shared/TESTING.md). It follows Google's documented behaviour:
//!
//! - objects: `PUT/GET/HEAD/DELETE /<bucket>/<object>` (object names percent-encoded), with an
//!   `ETag` (quoted MD5 of the content for simple uploads, as Google documents for
//!   non-composite objects; `"<md5 of part md5s>-<n>"` for multipart uploads, which Google
//!   documents only as "not an MD5"), `x-goog-generation` (a new, larger number on every write),
//!   `Last-Modified`, `Content-Length`, `Range` requests, and `If-Match`/`If-None-Match`;
//! - generation preconditions (`x-goog-if-generation-match`): `0` means "only if no live object
//!   exists", any other value "only if the live object has this generation"; otherwise
//!   `412 PreconditionFailed` and nothing is written;
//! - copies (`PUT` with `x-goog-copy-source`, same preconditions);
//! - listing (`GET /<bucket>?list-type=2`, ListObjectsV2): `prefix`, `delimiter` (common
//!   prefixes), `start-after`, `max-keys`, pages linked by `continuation-token` /
//!   `NextContinuationToken` with `IsTruncated`;
//! - XML multipart uploads: `POST ?uploads` (initiate), `PUT ?partNumber&uploadId`,
//!   `POST ?uploadId` (complete: parts in ascending order, ETags must match, the object appears
//!   only then), `DELETE ?uploadId` (abort);
//! - errors as `<Error><Code>…</Code><Message>…</Message></Error>` with 404 `NoSuchKey` /
//!   `NoSuchBucket` / `NoSuchUpload`, 412 `PreconditionFailed`, 400 `InvalidArgument`/`InvalidPart`.
//!
//! Not modelled: authentication (any bearer token is accepted), metageneration, object
//! versioning beyond the live generation, the JSON API.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use md5::{Digest, Md5};

/// One stored object.
#[derive(Debug, Clone)]
struct Object {
    data: Bytes,
    generation: i64,
    etag: String,
    updated: jiff::Timestamp,
    content_type: String,
}

#[derive(Debug, Default)]
struct Upload {
    bucket: String,
    name: String,
    parts: BTreeMap<u32, (String, Bytes)>,
}

#[derive(Debug)]
struct Inner {
    buckets: BTreeMap<String, BTreeMap<String, Object>>,
    uploads: HashMap<String, Upload>,
    last_generation: i64,
    page_size: usize,
    requests: Vec<String>,
}

type Shared = Arc<Mutex<Inner>>;

/// A running fake GCS on 127.0.0.1; stops on drop.
pub struct FakeGcs {
    state: Shared,
    pub endpoint: String,
    dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeGcs {
    /// Starts the server on its own thread and runtime (so it works from sync and async tests).
    pub fn start() -> anyhow::Result<FakeGcs> {
        FakeGcs::start_with_page_size(1000)
    }

    /// Like [`FakeGcs::start`], with list pages of at most `page_size` entries (GCS's default
    /// and maximum is 1000) so that pagination can be exercised with few objects.
    pub fn start_with_page_size(page_size: usize) -> anyhow::Result<FakeGcs> {
        let state: Shared = Arc::new(Mutex::new(Inner {
            buckets: BTreeMap::new(),
            uploads: HashMap::new(),
            last_generation: jiff::Timestamp::now().as_microsecond(),
            page_size: page_size.clamp(1, 1000),
            requests: Vec::new(),
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr: SocketAddr = listener.local_addr()?;
        let app = Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::disable())
            .with_state(state.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.await;
                    })
                    .await;
            });
        });
        let dir = tempfile::Builder::new().prefix("pgpilot-gcs-").tempdir()?;
        Ok(FakeGcs {
            state,
            endpoint: format!("http://{addr}"),
            dir,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// Creates an empty bucket.
    pub fn create_bucket(&self, name: &str) {
        self.state
            .lock()
            .expect("lock")
            .buckets
            .entry(name.to_owned())
            .or_default();
    }

    /// A service-account JSON file that makes object_store talk to this server without OAuth
    /// (`disable_oauth`, `gcs_base_url`: object_store's documented hooks for test servers).
    pub fn service_account_file(&self) -> anyhow::Result<std::path::PathBuf> {
        let path = self.dir.path().join("service-account.json");
        let json = serde_json::json!({
            "disable_oauth": true,
            "gcs_base_url": self.endpoint,
            "client_email": "test@example.iam.gserviceaccount.com",
            "private_key": "",
            "private_key_id": "",
        });
        crate::write_secret(&path, serde_json::to_vec(&json)?)?;
        Ok(path)
    }

    /// The requests served so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().expect("lock").requests.clone()
    }

    /// Names of the live objects in a bucket.
    pub fn object_names(&self, bucket: &str) -> Vec<String> {
        let s = self.state.lock().expect("lock");
        s.buckets
            .get(bucket)
            .map(|b| b.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Multipart uploads initiated and neither completed nor aborted.
    pub fn pending_uploads(&self) -> usize {
        self.state.lock().expect("lock").uploads.len()
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{}</Message></Error>",
        xml_escape(message)
    );
    (
        status,
        [(header::CONTENT_TYPE, "application/xml; charset=UTF-8")],
        body,
    )
        .into_response()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn md5_hex(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn http_date(t: jiff::Timestamp) -> String {
    t.strftime("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

async fn handle(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let q: HashMap<&str, &str> = query
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let path = uri.path().trim_start_matches('/');
    let (bucket, object) = match path.split_once('/') {
        Some((b, o)) => (decode(b), decode(o)),
        None => (decode(path), String::new()),
    };
    let mut s = state.lock().expect("lock");
    s.requests.push(format!(
        "{method} {}",
        uri.path_and_query().map(|p| p.as_str()).unwrap_or("")
    ));
    if !s.buckets.contains_key(&bucket) {
        return error(
            StatusCode::NOT_FOUND,
            "NoSuchBucket",
            &format!("The specified bucket {bucket} does not exist."),
        );
    }
    if object.is_empty() {
        return match method {
            Method::GET => list(&s, &bucket, &q),
            _ => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "bucket operations other than list",
            ),
        };
    }
    match (
        method.clone(),
        q.contains_key("uploads"),
        q.get("uploadId").copied(),
    ) {
        (Method::POST, true, _) => {
            let id = format!("{:032x}", rand_u128());
            s.uploads.insert(
                id.clone(),
                Upload {
                    bucket: bucket.clone(),
                    name: object.clone(),
                    parts: BTreeMap::new(),
                },
            );
            let body = format!(
                "<?xml version='1.0' encoding='UTF-8'?><InitiateMultipartUploadResult><Bucket>{}</Bucket><Key>{}</Key><UploadId>{id}</UploadId></InitiateMultipartUploadResult>",
                xml_escape(&bucket),
                xml_escape(&object)
            );
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/xml")],
                body,
            )
                .into_response()
        }
        (Method::PUT, _, Some(id)) => {
            let Some(n) = q
                .get("partNumber")
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| (1..=10_000).contains(n))
            else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidArgument",
                    "partNumber must be 1..=10000",
                );
            };
            let Some(upload) = s
                .uploads
                .get_mut(id)
                .filter(|u| u.bucket == bucket && u.name == object)
            else {
                return error(
                    StatusCode::NOT_FOUND,
                    "NoSuchUpload",
                    "The requested upload was not found.",
                );
            };
            let etag = format!("\"{}\"", md5_hex(&[&body]));
            upload.parts.insert(n, (etag.clone(), body));
            (StatusCode::OK, [(header::ETAG, etag)]).into_response()
        }
        (Method::POST, _, Some(id)) => complete(&mut s, &bucket, &object, id, &body),
        (Method::DELETE, _, Some(id)) => match s.uploads.remove(id) {
            Some(_) => StatusCode::NO_CONTENT.into_response(),
            None => error(
                StatusCode::NOT_FOUND,
                "NoSuchUpload",
                "The requested upload was not found.",
            ),
        },
        (Method::PUT, _, None) => {
            let data = match headers
                .get("x-goog-copy-source")
                .and_then(|v| v.to_str().ok())
            {
                Some(source) => {
                    let source = decode(source.trim_start_matches('/'));
                    let Some((sb, so)) = source.split_once('/') else {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "InvalidArgument",
                            "x-goog-copy-source",
                        );
                    };
                    match s.buckets.get(sb).and_then(|b| b.get(so)) {
                        Some(o) => o.data.clone(),
                        None => {
                            return error(
                                StatusCode::NOT_FOUND,
                                "NoSuchKey",
                                "The specified key does not exist.",
                            );
                        }
                    }
                }
                None => body,
            };
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/octet-stream")
                .to_owned();
            let etag = format!("\"{}\"", md5_hex(&[&data]));
            write_object(&mut s, &bucket, &object, &headers, data, etag, content_type)
        }
        (Method::GET | Method::HEAD, _, None) => {
            read_object(&s, &bucket, &object, &q, &headers, method == Method::HEAD)
        }
        (Method::DELETE, _, None) => {
            match s.buckets.get_mut(&bucket).and_then(|b| b.remove(&object)) {
                Some(_) => StatusCode::NO_CONTENT.into_response(),
                None => error(
                    StatusCode::NOT_FOUND,
                    "NoSuchKey",
                    "The specified key does not exist.",
                ),
            }
        }
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "unsupported request",
        ),
    }
}

/// Checks `x-goog-if-generation-match` against the live object, as Google documents it:
/// the error response when the precondition does not hold.
fn precondition_failure(current: Option<&Object>, headers: &HeaderMap) -> Option<Response> {
    let value = headers.get("x-goog-if-generation-match")?;
    let Some(wanted) = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
    else {
        return Some(error(
            StatusCode::BAD_REQUEST,
            "InvalidArgument",
            "x-goog-if-generation-match is not a number",
        ));
    };
    let holds = match (wanted, current) {
        (0, None) => true,
        (0, Some(_)) => false,
        (g, Some(o)) => o.generation == g,
        (_, None) => false,
    };
    (!holds).then(|| {
        error(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            "At least one of the pre-conditions you specified did not hold.",
        )
    })
}

fn write_object(
    s: &mut Inner,
    bucket: &str,
    name: &str,
    headers: &HeaderMap,
    data: Bytes,
    etag: String,
    content_type: String,
) -> Response {
    let current = s.buckets.get(bucket).and_then(|b| b.get(name));
    if let Some(r) = precondition_failure(current, headers) {
        return r;
    }
    s.last_generation = (s.last_generation + 1).max(jiff::Timestamp::now().as_microsecond());
    let object = Object {
        data,
        generation: s.last_generation,
        etag: etag.clone(),
        updated: jiff::Timestamp::now(),
        content_type,
    };
    let generation = object.generation;
    s.buckets
        .get_mut(bucket)
        .expect("bucket checked")
        .insert(name.to_owned(), object);
    (
        StatusCode::OK,
        [
            (header::ETAG, etag),
            (
                header::HeaderName::from_static("x-goog-generation"),
                generation.to_string(),
            ),
        ],
    )
        .into_response()
}

fn complete(s: &mut Inner, bucket: &str, name: &str, id: &str, body: &[u8]) -> Response {
    let Some(upload) = s
        .uploads
        .get(id)
        .filter(|u| u.bucket == bucket && u.name == name)
    else {
        return error(
            StatusCode::NOT_FOUND,
            "NoSuchUpload",
            "The requested upload was not found.",
        );
    };
    let text = String::from_utf8_lossy(body);
    let mut listed = Vec::new();
    for part in text.split("<Part>").skip(1) {
        let field = |tag: &str| -> Option<String> {
            let start = part.find(&format!("<{tag}>"))? + tag.len() + 2;
            let end = part[start..].find(&format!("</{tag}>"))? + start;
            Some(part[start..end].trim().replace("&quot;", "\""))
        };
        let (Some(n), Some(etag)) = (
            field("PartNumber").and_then(|n| n.parse::<u32>().ok()),
            field("ETag"),
        ) else {
            return error(
                StatusCode::BAD_REQUEST,
                "MalformedXML",
                "a Part needs PartNumber and ETag",
            );
        };
        listed.push((n, etag));
    }
    if listed.is_empty() {
        return error(StatusCode::BAD_REQUEST, "MalformedXML", "no parts listed");
    }
    if listed.windows(2).any(|w| w[0].0 >= w[1].0) {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidPartOrder",
            "parts must be listed in ascending order",
        );
    }
    let mut data = Vec::new();
    let mut digests = Vec::new();
    for (n, etag) in &listed {
        match upload.parts.get(n) {
            Some((stored, bytes)) if stored == etag => {
                data.extend_from_slice(bytes);
                digests.push(stored.trim_matches('"').to_owned());
            }
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidPart",
                    &format!("part {n} was not uploaded with that ETag"),
                );
            }
        }
    }
    let raw: Vec<u8> = digests
        .iter()
        .flat_map(|d| {
            (0..d.len())
                .step_by(2)
                .filter_map(move |i| u8::from_str_radix(&d[i..i + 2], 16).ok())
        })
        .collect();
    let etag = format!("\"{}-{}\"", md5_hex(&[&raw]), listed.len());
    s.uploads.remove(id);
    let response = write_object(
        s,
        bucket,
        name,
        &HeaderMap::new(),
        Bytes::from(data),
        etag.clone(),
        "application/octet-stream".into(),
    );
    if !response.status().is_success() {
        return response;
    }
    let generation = s.buckets[bucket][name].generation;
    let body = format!(
        "<?xml version='1.0' encoding='UTF-8'?><CompleteMultipartUploadResult><Location>/{0}/{1}</Location><Bucket>{0}</Bucket><Key>{1}</Key><ETag>{2}</ETag></CompleteMultipartUploadResult>",
        xml_escape(bucket),
        xml_escape(name),
        xml_escape(&etag)
    );
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/xml".to_owned()),
            (
                header::HeaderName::from_static("x-goog-generation"),
                generation.to_string(),
            ),
        ],
        body,
    )
        .into_response()
}

fn read_object(
    s: &Inner,
    bucket: &str,
    name: &str,
    q: &HashMap<&str, &str>,
    headers: &HeaderMap,
    head: bool,
) -> Response {
    let Some(o) = s.buckets[bucket].get(name) else {
        return error(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "The specified key does not exist.",
        );
    };
    if let Some(g) = q.get("generation")
        && g.parse::<i64>().ok() != Some(o.generation)
    {
        // Only the live generation is kept (no object versioning).
        return error(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "The specified key does not exist.",
        );
    }
    let matches = |v: &str| v.split(',').any(|t| t.trim() == "*" || t.trim() == o.etag);
    if let Some(v) = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok())
        && !matches(v)
    {
        return error(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            "If-Match",
        );
    }
    if let Some(v) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        && matches(v)
    {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    let len = o.data.len() as u64;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_range(v, len));
    let mut builder = Response::builder()
        .header(header::ETAG, &o.etag)
        .header(header::LAST_MODIFIED, http_date(o.updated))
        .header(header::CONTENT_TYPE, &o.content_type)
        .header("x-goog-generation", o.generation.to_string())
        .header("x-goog-stored-content-length", len.to_string())
        .header(header::ACCEPT_RANGES, "bytes");
    let data = match range {
        Some(Err(())) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(Body::empty())
                .expect("response");
        }
        Some(Ok((start, end))) => {
            builder = builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
            o.data.slice(start as usize..=end as usize)
        }
        None => o.data.clone(),
    };
    builder = builder.header(header::CONTENT_LENGTH, data.len().to_string());
    builder
        .body(if head {
            Body::empty()
        } else {
            Body::from(data)
        })
        .expect("response")
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n` → inclusive range; `Err` when not satisfiable; `None`
/// when absent or not understood (then the whole object is returned, as HTTP allows).
fn parse_range(v: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = v.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let r = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            if n == 0 || len == 0 {
                Err(())
            } else {
                Ok((len.saturating_sub(n), len - 1))
            }
        }
        (a, "") => {
            let a: u64 = a.parse().ok()?;
            if a >= len { Err(()) } else { Ok((a, len - 1)) }
        }
        (a, b) => {
            let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
            if a > b || a >= len {
                Err(())
            } else {
                Ok((a, b.min(len - 1)))
            }
        }
    };
    Some(r)
}

fn list(s: &Inner, bucket: &str, q: &HashMap<&str, &str>) -> Response {
    let prefix = q.get("prefix").copied().unwrap_or("");
    let delimiter = q.get("delimiter").copied().filter(|d| !d.is_empty());
    let max_keys = q
        .get("max-keys")
        .and_then(|m| m.parse::<usize>().ok())
        .unwrap_or(1000)
        .min(s.page_size)
        .max(1);
    // The continuation token is opaque to clients; here it is the last name returned, hex-encoded.
    let after = match q.get("continuation-token") {
        Some(t) => match hex_decode(t) {
            Some(name) => Some(name),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidArgument",
                    "Invalid continuation token.",
                );
            }
        },
        None => q.get("start-after").map(|s| s.to_string()),
    };
    let mut contents = String::new();
    let mut prefixes: Vec<String> = Vec::new();
    let mut count = 0;
    let mut last = None;
    let mut truncated = false;
    for (name, o) in s.buckets[bucket].range::<String, _>((
        after
            .as_ref()
            .map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded),
        std::ops::Bound::Unbounded,
    )) {
        if !name.starts_with(prefix) {
            if name.as_str() > prefix {
                break;
            }
            continue;
        }
        // Objects under a common prefix collapse into one entry.
        let entry = delimiter.and_then(|d| {
            name[prefix.len()..]
                .find(d)
                .map(|i| name[..prefix.len() + i + d.len()].to_owned())
        });
        if let Some(p) = &entry
            && prefixes.last() == Some(p)
        {
            last = Some(name.clone());
            continue;
        }
        if count == max_keys {
            truncated = true;
            break;
        }
        count += 1;
        last = Some(name.clone());
        match entry {
            Some(p) => prefixes.push(p),
            None => contents.push_str(&format!(
                "<Contents><Key>{}</Key><Generation>{}</Generation><LastModified>{}</LastModified><ETag>{}</ETag><Size>{}</Size></Contents>",
                xml_escape(name),
                o.generation,
                o.updated.strftime("%Y-%m-%dT%H:%M:%S%.3fZ"),
                xml_escape(&o.etag),
                o.data.len()
            )),
        }
    }
    let mut body = format!(
        "<?xml version='1.0' encoding='UTF-8'?><ListBucketResult xmlns='http://doc.s3.amazonaws.com/2006-03-01'><Name>{}</Name><Prefix>{}</Prefix><KeyCount>{count}</KeyCount><MaxKeys>{max_keys}</MaxKeys><IsTruncated>{truncated}</IsTruncated>",
        xml_escape(bucket),
        xml_escape(prefix)
    );
    if truncated && let Some(last) = last {
        body.push_str(&format!(
            "<NextContinuationToken>{}</NextContinuationToken>",
            hex_encode(&last)
        ));
    }
    body.push_str(&contents);
    for p in prefixes {
        body.push_str(&format!(
            "<CommonPrefixes><Prefix>{}</Prefix></CommonPrefixes>",
            xml_escape(&p)
        ));
    }
    body.push_str("</ListBucketResult>");
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/xml")],
        body,
    )
        .into_response()
}

fn hex_encode(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn rand_u128() -> u128 {
    (crate::s3::rand_u64() as u128) << 64 | crate::s3::rand_u64() as u128
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(g: &FakeGcs, path: &str) -> String {
        format!("{}/{path}", g.endpoint)
    }

    fn tag(xml: &str, name: &str) -> Vec<String> {
        xml.split(&format!("<{name}>"))
            .skip(1)
            .filter_map(|p| p.split(&format!("</{name}>")).next().map(str::to_owned))
            .collect()
    }

    #[tokio::test]
    async fn generation_preconditions_follow_google() {
        let g = FakeGcs::start().unwrap();
        g.create_bucket("b");
        let c = reqwest::Client::new();
        let put = |v: &'static str, m: Option<&str>| {
            let mut r = c.put(url(&g, "b/dir%2Fo")).body(v);
            if let Some(m) = m {
                r = r.header("x-goog-if-generation-match", m);
            }
            r.send()
        };
        let first = put("one", Some("0")).await.unwrap();
        assert_eq!(first.status(), 200);
        let gen1: i64 = first.headers()["x-goog-generation"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            first.headers()["etag"],
            format!("\"{}\"", md5_hex(&[b"one"]))
        );
        // ifGenerationMatch=0 with a live object: 412, and the object is unchanged.
        let again = put("two", Some("0")).await.unwrap();
        assert_eq!(again.status(), 412);
        assert!(
            again
                .text()
                .await
                .unwrap()
                .contains("<Code>PreconditionFailed</Code>")
        );
        assert_eq!(
            c.get(url(&g, "b/dir/o"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "one"
        );
        // Matching the live generation succeeds and yields a larger one; a stale one fails.
        let second = put("two", Some(&gen1.to_string())).await.unwrap();
        assert_eq!(second.status(), 200);
        let gen2: i64 = second.headers()["x-goog-generation"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(gen2 > gen1);
        assert_eq!(
            put("three", Some(&gen1.to_string()))
                .await
                .unwrap()
                .status(),
            412
        );
        // A generation precondition on a missing object (other than 0) fails.
        let r = c
            .put(url(&g, "b/missing"))
            .header("x-goog-if-generation-match", "5")
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 412);
        // Unconditional overwrite.
        assert_eq!(put("four", None).await.unwrap().status(), 200);
        assert_eq!(
            c.put(url(&g, "nobucket/o"))
                .body("x")
                .send()
                .await
                .unwrap()
                .status(),
            404
        );
    }

    #[tokio::test]
    async fn get_head_etag_ranges_and_conditionals() {
        let g = FakeGcs::start().unwrap();
        g.create_bucket("b");
        let c = reqwest::Client::new();
        c.put(url(&g, "b/o"))
            .body("0123456789")
            .send()
            .await
            .unwrap();
        let head = c.head(url(&g, "b/o")).send().await.unwrap();
        assert_eq!(head.status(), 200);
        let etag = head.headers()["etag"].to_str().unwrap().to_owned();
        assert_eq!(head.headers()["content-length"], "10");
        assert!(
            head.headers().contains_key("last-modified")
                && head.headers().contains_key("x-goog-generation")
        );
        let r = c
            .get(url(&g, "b/o"))
            .header("Range", "bytes=2-4")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        assert_eq!(r.headers()["content-range"], "bytes 2-4/10");
        assert_eq!(r.text().await.unwrap(), "234");
        assert_eq!(
            c.get(url(&g, "b/o"))
                .header("Range", "bytes=-3")
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "789"
        );
        assert_eq!(
            c.get(url(&g, "b/o"))
                .header("Range", "bytes=20-")
                .send()
                .await
                .unwrap()
                .status(),
            416
        );
        assert_eq!(
            c.get(url(&g, "b/o"))
                .header("If-None-Match", &etag)
                .send()
                .await
                .unwrap()
                .status(),
            304
        );
        assert_eq!(
            c.get(url(&g, "b/o"))
                .header("If-Match", "\"other\"")
                .send()
                .await
                .unwrap()
                .status(),
            412
        );
        assert_eq!(c.get(url(&g, "b/nope")).send().await.unwrap().status(), 404);
        assert_eq!(c.delete(url(&g, "b/o")).send().await.unwrap().status(), 204);
        assert_eq!(c.delete(url(&g, "b/o")).send().await.unwrap().status(), 404);
    }

    #[tokio::test]
    async fn list_paginates_with_continuation_tokens_and_delimiters() {
        let g = FakeGcs::start_with_page_size(2).unwrap();
        g.create_bucket("b");
        let c = reqwest::Client::new();
        for name in ["a/1", "a/2", "a/3", "a/sub/4", "a/sub/5", "b/6"] {
            c.put(url(&g, &format!("b/{}", name.replace('/', "%2F"))))
                .body(name)
                .send()
                .await
                .unwrap();
        }
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            let mut q = vec![("list-type", "2".to_owned()), ("prefix", "a/".to_owned())];
            if let Some(t) = &token {
                q.push(("continuation-token", t.clone()));
            }
            let xml = c
                .get(url(&g, "b"))
                .query(&q)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            pages += 1;
            keys.extend(tag(&xml, "Key"));
            token = tag(&xml, "NextContinuationToken").into_iter().next();
            assert_eq!(tag(&xml, "IsTruncated")[0] == "true", token.is_some());
            if token.is_none() {
                break;
            }
        }
        assert_eq!(keys, ["a/1", "a/2", "a/3", "a/sub/4", "a/sub/5"]);
        assert_eq!(pages, 3);
        let xml = c
            .get(url(&g, "b"))
            .query(&[
                ("list-type", "2"),
                ("prefix", "a/"),
                ("delimiter", "/"),
                ("max-keys", "10"),
            ])
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(tag(&xml, "Key"), ["a/1", "a/2"]);
        let xml2 = c
            .get(url(&g, "b"))
            .query(&[
                ("list-type", "2"),
                ("prefix", "a/"),
                ("delimiter", "/"),
                ("continuation-token", &tag(&xml, "NextContinuationToken")[0]),
            ])
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(tag(&xml2, "Key"), ["a/3"]);
        assert_eq!(tag(&xml2, "Prefix"), ["a/", "a/sub/"]);
        let bad = c
            .get(url(&g, "b"))
            .query(&[("list-type", "2"), ("continuation-token", "zz")])
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), 400);
    }

    #[tokio::test]
    async fn multipart_assembles_parts_in_order_and_aborts() {
        let g = FakeGcs::start().unwrap();
        g.create_bucket("b");
        let c = reqwest::Client::new();
        let init = c
            .post(url(&g, "b/big?uploads"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let id = tag(&init, "UploadId")[0].clone();
        let mut etags = Vec::new();
        for (n, part) in [(1, "aaa"), (2, "bbb"), (3, "ccc")] {
            let r = c
                .put(url(&g, &format!("b/big?partNumber={n}&uploadId={id}")))
                .body(part)
                .send()
                .await
                .unwrap();
            etags.push(r.headers()["etag"].to_str().unwrap().to_owned());
        }
        assert!(
            g.object_names("b").is_empty(),
            "invisible before completion"
        );
        let body = |order: &[usize]| {
            let parts: String = order
                .iter()
                .map(|&i| {
                    format!(
                        "<Part><ETag>{}</ETag><PartNumber>{}</PartNumber></Part>",
                        etags[i],
                        i + 1
                    )
                })
                .collect();
            format!("<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>")
        };
        let bad = c
            .post(url(&g, &format!("b/big?uploadId={id}")))
            .body(body(&[1, 0, 2]))
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), 400);
        let ok = c
            .post(url(&g, &format!("b/big?uploadId={id}")))
            .body(body(&[0, 1, 2]))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        assert!(tag(&ok.text().await.unwrap(), "ETag")[0].ends_with("-3&quot;"));
        assert_eq!(
            c.get(url(&g, "b/big"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "aaabbbccc"
        );
        assert_eq!(g.pending_uploads(), 0);

        let init = c
            .post(url(&g, "b/gone?uploads"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let id = tag(&init, "UploadId")[0].clone();
        c.put(url(&g, &format!("b/gone?partNumber=1&uploadId={id}")))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(
            c.delete(url(&g, &format!("b/gone?uploadId={id}")))
                .send()
                .await
                .unwrap()
                .status(),
            204
        );
        assert_eq!(g.pending_uploads(), 0);
        assert_eq!(c.get(url(&g, "b/gone")).send().await.unwrap().status(), 404);
        assert_eq!(
            c.delete(url(&g, &format!("b/gone?uploadId={id}")))
                .send()
                .await
                .unwrap()
                .status(),
            404
        );
    }
}
