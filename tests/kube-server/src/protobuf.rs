//! Just enough of the Kubernetes protobuf encoding to accept what kubectl's imperative
//! commands send (`kubectl create configmap|secret|namespace` post
//! `application/vnd.kubernetes.protobuf`, with no fallback to JSON): the `k8s\0` envelope
//! (`runtime.Unknown`), `ObjectMeta`, and the ConfigMap, Secret and Namespace messages, decoded
//! into the JSON the rest of the server works on. Field numbers are those of Kubernetes'
//! `generated.proto` files. Any other type is refused with 415, as by a server without the codec.

use base64::Engine as _;
use serde_json::{Map, Value, json};

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("not a Kubernetes protobuf envelope")]
    NoMagic,
    #[error("truncated or malformed protobuf")]
    Malformed,
    #[error("protobuf bodies are understood for ConfigMap, Secret and Namespace only, not {0}")]
    Unsupported(String),
}

/// One field of a message: its number and its raw value.
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, ProtoError> {
    let mut out = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or(ProtoError::Malformed)?;
        *pos += 1;
        out |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(out);
        }
    }
    Err(ProtoError::Malformed)
}

/// The fields of one message, in order.
fn fields(buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>, ProtoError> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let field = match key & 7 {
            0 => Field::Varint(varint(buf, &mut pos)?),
            2 => {
                let len =
                    usize::try_from(varint(buf, &mut pos)?).map_err(|_| ProtoError::Malformed)?;
                let end = pos
                    .checked_add(len)
                    .filter(|e| *e <= buf.len())
                    .ok_or(ProtoError::Malformed)?;
                let bytes = &buf[pos..end];
                pos = end;
                Field::Bytes(bytes)
            }
            // Fixed 64- and 32-bit fields do not occur in these messages; skip them anyway.
            1 => {
                pos += 8;
                continue;
            }
            5 => {
                pos += 4;
                continue;
            }
            _ => return Err(ProtoError::Malformed),
        };
        out.push((key >> 3, field));
    }
    Ok(out)
}

fn string(b: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(b).into_owned())
}

/// A `map<string, string|bytes>` entry (`key = 1`, `value = 2`).
fn map_entry(b: &[u8], bytes_value: bool) -> Result<(String, Value), ProtoError> {
    let (mut k, mut v) = (String::new(), Value::String(String::new()));
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(x)) => k = String::from_utf8_lossy(x).into_owned(),
            (2, Field::Bytes(x)) if bytes_value => {
                v = Value::String(base64::engine::general_purpose::STANDARD.encode(x));
            }
            (2, Field::Bytes(x)) => v = string(x),
            _ => {}
        }
    }
    Ok((k, v))
}

fn insert_entry(obj: &mut Map<String, Value>, field: &str, entry: (String, Value)) {
    obj.entry(field).or_insert_with(|| json!({}))[&entry.0] = entry.1;
}

fn push(obj: &mut Map<String, Value>, field: &str, v: Value) {
    if let Value::Array(a) = obj.entry(field).or_insert_with(|| json!([])) {
        a.push(v);
    }
}

fn owner_reference(b: &[u8]) -> Result<Value, ProtoError> {
    let mut r = Map::new();
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(x)) => r.insert("kind".into(), string(x)),
            (3, Field::Bytes(x)) => r.insert("name".into(), string(x)),
            (4, Field::Bytes(x)) => r.insert("uid".into(), string(x)),
            (5, Field::Bytes(x)) => r.insert("apiVersion".into(), string(x)),
            (6, Field::Varint(x)) => r.insert("controller".into(), json!(x != 0)),
            (7, Field::Varint(x)) => r.insert("blockOwnerDeletion".into(), json!(x != 0)),
            _ => None,
        };
    }
    Ok(Value::Object(r))
}

/// The client-settable part of `ObjectMeta`; server-set fields are the server's to fill.
fn object_meta(b: &[u8]) -> Result<Value, ProtoError> {
    let mut m = Map::new();
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(x)) => {
                m.insert("name".into(), string(x));
            }
            (2, Field::Bytes(x)) => {
                m.insert("generateName".into(), string(x));
            }
            (3, Field::Bytes(x)) => {
                m.insert("namespace".into(), string(x));
            }
            (6, Field::Bytes(x)) => {
                m.insert("resourceVersion".into(), string(x));
            }
            (11, Field::Bytes(x)) => insert_entry(&mut m, "labels", map_entry(x, false)?),
            (12, Field::Bytes(x)) => insert_entry(&mut m, "annotations", map_entry(x, false)?),
            (13, Field::Bytes(x)) => {
                let r = owner_reference(x)?;
                push(&mut m, "ownerReferences", r);
            }
            (14, Field::Bytes(x)) => {
                push(&mut m, "finalizers", string(x));
            }
            _ => {}
        }
    }
    Ok(Value::Object(m))
}

/// Decodes a `k8s\0`-framed body into JSON.
pub fn decode(body: &[u8]) -> Result<Value, ProtoError> {
    let inner = body.strip_prefix(b"k8s\0").ok_or(ProtoError::NoMagic)?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (n, f) in fields(inner)? {
        match (n, f) {
            (1, Field::Bytes(tm)) => {
                for (tn, tf) in fields(tm)? {
                    match (tn, tf) {
                        (1, Field::Bytes(x)) => {
                            api_version = String::from_utf8_lossy(x).into_owned()
                        }
                        (2, Field::Bytes(x)) => kind = String::from_utf8_lossy(x).into_owned(),
                        _ => {}
                    }
                }
            }
            (2, Field::Bytes(x)) => raw = x,
            _ => {}
        }
    }
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    let (bytes_data, string_data_field, type_field, immutable_field) =
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "ConfigMap") => (false, None, None, Some(4)),
            ("v1", "Secret") => (true, Some(4), Some(3), Some(5)),
            ("v1", "Namespace") => (false, None, None, None),
            _ => return Err(ProtoError::Unsupported(format!("{api_version}/{kind}"))),
        };
    for (n, f) in fields(raw)? {
        match (n, f) {
            (1, Field::Bytes(x)) => {
                obj.insert("metadata".into(), object_meta(x)?);
            }
            (2, Field::Bytes(x)) if kind == "Namespace" => {
                // NamespaceSpec { repeated string finalizers = 1 }
                let finalizers: Vec<Value> = fields(x)?
                    .into_iter()
                    .filter_map(|(n, f)| matches!(n, 1).then_some(f))
                    .filter_map(|f| match f {
                        Field::Bytes(b) => Some(string(b)),
                        Field::Varint(_) => None,
                    })
                    .collect();
                obj.insert("spec".into(), json!({"finalizers": finalizers}));
            }
            (2, Field::Bytes(x)) => insert_entry(&mut obj, "data", map_entry(x, bytes_data)?),
            (3, Field::Bytes(x)) if kind == "ConfigMap" => {
                insert_entry(&mut obj, "binaryData", map_entry(x, true)?)
            }
            (n, Field::Bytes(x)) if Some(n) == type_field => {
                obj.insert("type".into(), string(x));
            }
            (n, Field::Bytes(x)) if Some(n) == string_data_field => {
                insert_entry(&mut obj, "stringData", map_entry(x, false)?);
            }
            (n, Field::Varint(x)) if Some(n) == immutable_field => {
                obj.insert("immutable".into(), json!(x != 0));
            }
            _ => {}
        }
    }
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len_field(n: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![(n << 3 | 2) as u8];
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
        out
    }

    fn entry(k: &str, v: &[u8]) -> Vec<u8> {
        [len_field(1, k.as_bytes()), len_field(2, v)].concat()
    }

    #[test]
    fn decodes_a_secret_envelope() {
        let meta = [len_field(1, b"s"), len_field(11, &entry("app", b"pg"))].concat();
        let secret = [
            len_field(1, &meta),
            len_field(2, &entry("token", b"hi")),
            len_field(3, b"Opaque"),
            vec![5 << 3, 1],
        ]
        .concat();
        let type_meta = [len_field(1, b"v1"), len_field(2, b"Secret")].concat();
        let body = [
            b"k8s\0".to_vec(),
            len_field(1, &type_meta),
            len_field(2, &secret),
        ]
        .concat();
        assert_eq!(
            decode(&body).unwrap(),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "labels": {"app": "pg"}},
                "data": {"token": "aGk="}, "type": "Opaque", "immutable": true})
        );
        let pod = [
            b"k8s\0".to_vec(),
            len_field(1, &[len_field(1, b"v1"), len_field(2, b"Pod")].concat()),
        ]
        .concat();
        assert!(matches!(decode(&pod), Err(ProtoError::Unsupported(_))));
        assert!(decode(b"{}").is_err());
    }
}
