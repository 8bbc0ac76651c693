//! API keys as hypertool keeps them: a SHA-256 digest, compared in constant time.
//!
//! A key is read from its environment variable once, at load, and hashed at once; the plain value
//! is never stored in the configuration, so it cannot reach a log line, a `Debug` print, a metric
//! or an error body. Keys are long random values (at least [`MIN_KEY_LEN`] characters), so an
//! unsalted fast hash is enough: there is nothing to brute-force that is easier than the key.

use std::fmt;

use subtle::ConstantTimeEq;

/// The shortest key accepted from an environment variable.
pub const MIN_KEY_LEN: usize = 16;

/// The SHA-256 digest of a key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        KeyHash(out)
    }

    /// Whether `presented` hashes to this digest, in time independent of where they differ.
    pub fn matches(&self, presented: &KeyHash) -> bool {
        self.0.ct_eq(&presented.0).into()
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash(<redacted>)")
    }
}

/// Reads the key in `$env_var` and hashes it; the error (for `key_path`) names the variable, never
/// its value.
pub fn key_from_env(env_var: &str) -> Result<KeyHash, String> {
    match std::env::var(env_var) {
        Ok(v) if v.trim().len() >= MIN_KEY_LEN => Ok(KeyHash::of(v.trim())),
        Ok(_) => Err(format!(
            "the key in ${env_var} is shorter than {MIN_KEY_LEN} characters; use a long random value (e.g. `openssl rand -hex 24`)"
        )),
        Err(_) => Err(format!(
            "environment variable ${env_var} is not set; export it before starting hypertool"
        )),
    }
}

/// `url` with any password replaced, for logs and errors: both the URL form
/// (`postgres://user:secret@host/db`) and the keyword form (`host=… password=secret`).
pub fn redacted(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***@{host}"),
                None => authority.to_string(),
            },
            None => authority.to_string(),
        };
        // A password can also ride in the query string.
        let tail = tail
            .split('&')
            .map(|p| match p.split_once("password=") {
                Some((head, _)) => format!("{head}password=***"),
                None => p.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&");
        return format!("{scheme}://{authority}{tail}");
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***".to_string()
            } else {
                kv.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_keys_match_and_others_do_not() {
        let k = KeyHash::of("ht-0123456789abcdef");
        assert!(k.matches(&KeyHash::of("ht-0123456789abcdef")));
        assert!(!k.matches(&KeyHash::of("ht-0123456789abcdeF")));
        assert_eq!(format!("{k:?}"), "KeyHash(<redacted>)");
    }
}
