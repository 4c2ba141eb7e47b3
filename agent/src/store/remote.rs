//! Builds the object_store client for s3://, gs:// and az:// from a validated config.
//! Credentials are read from the files the config names, or left to object_store's `from_env`
//! (AWS_*, GOOGLE_*, AZURE_* variables, instance metadata, workload identity).

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use super::config::{ConfigError, StoreConfig, StoreLocation};

/// Azurite's well-known development account and key (public, documented by Microsoft).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn read_secret(field: &'static str, path: &std::path::Path) -> Result<String, ConfigError> {
    pgpilot_common::secret_file::check_not_world_readable(field, path)
        .map_err(|problem| ConfigError::Invalid { field, problem })?;
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
        field,
        problem: format!("cannot read {}: {e}", path.display()),
    })?;
    let text = text.trim().to_owned();
    if text.is_empty() {
        return Err(ConfigError::Invalid {
            field,
            problem: format!("{} is empty", path.display()),
        });
    }
    Ok(text)
}

/// The object_store client for a remote location.
pub(crate) fn build(
    location: &StoreLocation,
    cfg: &StoreConfig,
) -> Result<Arc<dyn ObjectStore>, ConfigError> {
    // Plain HTTP: as configured; for S3 also as AWS_ALLOW_HTTP says (the client options below
    // replace those `from_env` read); else only towards an http:// endpoint, the configured
    // one or, for S3, AWS_ENDPOINT's.
    let s3 = matches!(location, StoreLocation::S3 { .. });
    let env = s3_env(cfg);
    let endpoint = cfg.endpoint.clone().or_else(|| {
        s3.then(|| env("aws_endpoint").or_else(|| env("aws_endpoint_url")))
            .flatten()
    });
    let allow_http = cfg
        .allow_http
        .or_else(|| {
            s3.then(|| env("aws_allow_http"))
                .flatten()
                .map(|v| v.eq_ignore_ascii_case("true") || v == "1")
        })
        .unwrap_or_else(|| endpoint.is_some_and(|e| e.starts_with("http://")));
    let options = ClientOptions::new()
        .with_timeout(Duration::from_secs(cfg.request_timeout_secs))
        .with_connect_timeout(Duration::from_secs(cfg.request_timeout_secs.min(10)))
        .with_allow_http(allow_http);
    // object_store retries each HTTP request on its own (5xx, connection errors); keep that short
    // so our whole-operation retries (retry.rs) stay in charge of the overall time.
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: Duration::from_secs(60),
    };
    let built = |r: object_store::Result<Arc<dyn ObjectStore>>| {
        r.map_err(|e| ConfigError::Invalid {
            field: "store",
            problem: format!("cannot build the client: {e}"),
        })
    };
    match location {
        StoreLocation::S3 { bucket, .. } => {
            let mut b = AmazonS3Builder::from_env();
            for (k, v) in prefixed_env(cfg, "AWS_") {
                if let Ok(key) = k.parse() {
                    b = b.with_config(key, v);
                }
            }
            let mut b = b
                .with_bucket_name(bucket)
                .with_client_options(options)
                .with_retry(retry);
            // Path style: as configured; else as AWS_VIRTUAL_HOSTED_STYLE_REQUEST says; else
            // for a store at its own endpoint (S3-compatible servers mostly need it), and
            // virtual-hosted style for AWS itself.
            match cfg.path_style {
                Some(p) => b = b.with_virtual_hosted_style_request(!p),
                None if env("aws_virtual_hosted_style_request").is_some() => {}
                None => {
                    let own_endpoint = cfg.endpoint.is_some()
                        || env("aws_endpoint").is_some()
                        || env("aws_endpoint_url").is_some();
                    b = b.with_virtual_hosted_style_request(!own_endpoint);
                }
            }
            if let Some(endpoint) = &cfg.endpoint {
                b = b.with_endpoint(endpoint);
            }
            match &cfg.region {
                Some(region) => b = b.with_region(region),
                None if std::env::var_os("AWS_REGION").is_none()
                    && std::env::var_os("AWS_DEFAULT_REGION").is_none() =>
                {
                    b = b.with_region("us-east-1");
                }
                None => {}
            }
            if let (Some(id), Some(secret)) = (&cfg.access_key_id_file, &cfg.secret_access_key_file)
            {
                b = b
                    .with_access_key_id(read_secret("access_key_id_file", id)?)
                    .with_secret_access_key(read_secret("secret_access_key_file", secret)?);
            }
            if let Some(token) = &cfg.session_token_file {
                b = b.with_token(read_secret("session_token_file", token)?);
            }
            built(b.build().map(|s| Arc::new(s) as _))
        }
        StoreLocation::Gcs { bucket, .. } => {
            let mut b = GoogleCloudStorageBuilder::from_env();
            for (k, v) in prefixed_env(cfg, "GOOGLE_") {
                if let Ok(key) = k.parse() {
                    b = b.with_config(key, v);
                }
            }
            let mut b = b
                .with_bucket_name(bucket)
                .with_client_options(options)
                .with_retry(retry);
            if let Some(path) = &cfg.gcs_service_account_file {
                pgpilot_common::secret_file::check_not_world_readable(
                    "gcs_service_account_file",
                    path,
                )
                .map_err(|problem| ConfigError::Invalid {
                    field: "gcs_service_account_file",
                    problem,
                })?;
                b = b.with_service_account_path(path.to_string_lossy());
            }
            if let Some(endpoint) = &cfg.endpoint {
                b = b.with_base_url(endpoint);
            }
            if cfg.gcs_anonymous {
                b = b.with_skip_signature(true);
            }
            built(b.build().map(|s| Arc::new(s) as _))
        }
        StoreLocation::Azure { container, .. } => {
            let mut b = MicrosoftAzureBuilder::from_env();
            for (k, v) in prefixed_env(cfg, "AZURE_") {
                if let Ok(key) = k.parse() {
                    b = b.with_config(key, v);
                }
            }
            let mut b = b
                .with_container_name(container)
                .with_client_options(options)
                .with_retry(retry);
            let key = cfg
                .azure_access_key_file
                .as_deref()
                .map(|p| read_secret("azure_access_key_file", p))
                .transpose()?;
            if cfg.azure_use_emulator {
                let account = cfg
                    .azure_account
                    .clone()
                    .unwrap_or_else(|| AZURITE_ACCOUNT.to_owned());
                b = b
                    .with_account(&account)
                    .with_access_key(key.unwrap_or_else(|| AZURITE_KEY.to_owned()));
                match &cfg.endpoint {
                    // Azurite serves path-style URLs, http://host:port/<account>/<container>/<blob>:
                    // an endpoint that includes the account gives exactly the emulator's requests.
                    Some(endpoint) => {
                        b = b
                            .with_endpoint(format!("{}/{account}", endpoint.trim_end_matches('/')))
                            .with_allow_http(true);
                    }
                    None => b = b.with_use_emulator(true),
                }
            } else {
                if let Some(account) = &cfg.azure_account {
                    b = b.with_account(account);
                }
                if let Some(key) = key {
                    b = b.with_access_key(key);
                }
                if let Some(endpoint) = &cfg.endpoint {
                    b = b.with_endpoint(endpoint.clone());
                }
            }
            built(b.build().map(|s| Arc::new(s) as _))
        }
        StoreLocation::File { .. } => unreachable!("file:// stores are not built by object_store"),
    }
}

/// This store's S3 environment: `name` (lower case, e.g. `aws_endpoint`) looked up under the
/// store's credentials prefix, or unprefixed when it has none.
fn s3_env(cfg: &StoreConfig) -> impl Fn(&str) -> Option<String> + '_ {
    move |name: &str| {
        let var = format!(
            "{}{}",
            cfg.credentials_env_prefix.as_deref().unwrap_or(""),
            name.to_ascii_uppercase()
        );
        std::env::var(var).ok().filter(|v| !v.is_empty())
    }
}

/// The environment variables `<credentials_env_prefix><family>…`, prefix stripped and
/// lower-cased as object_store's `from_env` parses its own (`aws_access_key_id`).
fn prefixed_env(cfg: &StoreConfig, family: &str) -> Vec<(String, String)> {
    let Some(prefix) = cfg.credentials_env_prefix.as_deref() else {
        return Vec::new();
    };
    std::env::vars()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix(prefix)?;
            rest.starts_with(family)
                .then(|| (rest.to_ascii_lowercase(), v))
        })
        .collect()
}
