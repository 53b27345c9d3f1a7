//! Verifying a JWT: one key and one algorithm, pinned at start-up.
//!
//! `--jwt-secret` accepts HS256 only; `--jwt-public-key` accepts RS256 (an
//! RSA key) or ES256 (an EC P-256 key) only. A token whose header names any
//! other algorithm — `none`, or HS256 signed with the public key as the
//! HMAC secret (algorithm confusion) — is refused before its signature is
//! looked at. Every token needs `exp`; `nbf` is checked when present;
//! `iss` and `aud` must match `--jwt-issuer` and `--jwt-audience` when
//! those are set (and a token that names an audience is refused when none
//! is configured). `--jwt-leeway` allows for clock skew.

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::Secret;
use super::grant::{Grant, TopicPatterns};

/// Shortest accepted HS256 secret, in bytes (RFC 7518 §3.2: a key of at
/// least the hash's size).
pub const MIN_SECRET_LEN: usize = 32;

/// How tokens are checked (from `--jwt-*`).
#[derive(Debug, Clone)]
pub struct JwtOptions {
    /// HS256 shared secret.
    pub secret: Option<Secret>,
    /// PEM text of an RSA or EC P-256 public key.
    pub public_key: Option<Vec<u8>>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
    /// The claim listing the topics a subscriber may read.
    pub topics_claim: String,
    /// The claim listing the topics a publisher may publish to.
    pub publish_claim: String,
    /// Refuse tokens without `exp` (Mercure's tokens often have none).
    pub require_exp: bool,
}

impl Default for JwtOptions {
    fn default() -> Self {
        JwtOptions {
            secret: None,
            public_key: None,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
            topics_claim: "topics".into(),
            publish_claim: "publish".into(),
            require_exp: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("give --jwt-secret or --jwt-public-key, not both")]
    Both,
    #[error("--jwt-secret must be at least {MIN_SECRET_LEN} bytes (HS256 needs a 256-bit key)")]
    ShortSecret,
    #[error("--jwt-public-key is not an RSA or EC (P-256) public key in PEM")]
    Pem,
}

/// Why a token was refused. The messages never include the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: {0}")]
    Missing(String),
    #[error("the Authorization header is not `Bearer <token>`")]
    NotBearer,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's signature is not valid")]
    BadSignature,
    #[error("the token is not signed with {0}, the only algorithm accepted")]
    Algorithm(&'static str),
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's issuer (iss) is not the one expected")]
    Issuer,
    #[error("the token's audience (aud) is not the one expected")]
    Audience,
    #[error("the token has no `{0}` claim")]
    MissingClaim(String),
    #[error("claim `{0}`: {1}")]
    Claim(String, String),
}

impl AuthError {
    /// Whether a token was presented at all (RFC 6750 then asks for
    /// `error="invalid_token"` in the challenge).
    pub fn token_presented(&self) -> bool {
        !matches!(self, AuthError::Missing(_))
    }
}

/// Checks tokens against the configured key; shared by both planes.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    algorithm: &'static str,
    topics_claim: String,
    publish_claim: String,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// `None` when neither a secret nor a public key is configured (no
    /// authentication).
    pub fn new(options: &JwtOptions) -> Result<Option<Verifier>, KeyError> {
        let (key, algorithm) = match (&options.secret, &options.public_key) {
            (Some(_), Some(_)) => return Err(KeyError::Both),
            (None, None) => return Ok(None),
            (Some(secret), None) => {
                if secret.expose().len() < MIN_SECRET_LEN {
                    return Err(KeyError::ShortSecret);
                }
                (
                    DecodingKey::from_secret(secret.expose().as_bytes()),
                    Algorithm::HS256,
                )
            }
            (None, Some(pem)) => match DecodingKey::from_rsa_pem(pem) {
                Ok(key) => (key, Algorithm::RS256),
                Err(_) => (
                    DecodingKey::from_ec_pem(pem).map_err(|_| KeyError::Pem)?,
                    Algorithm::ES256,
                ),
            },
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = options.leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = Vec::new();
        if options.require_exp {
            required.push("exp");
        } else {
            validation.validate_exp = true;
        }
        if let Some(iss) = &options.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        if let Some(aud) = &options.audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        Ok(Some(Verifier {
            key,
            validation,
            algorithm: match algorithm {
                Algorithm::HS256 => "HS256",
                Algorithm::RS256 => "RS256",
                _ => "ES256",
            },
            topics_claim: options.topics_claim.clone(),
            publish_claim: options.publish_claim.clone(),
        }))
    }

    /// The one algorithm accepted.
    pub fn algorithm(&self) -> &'static str {
        self.algorithm
    }

    /// Checks `token` and returns its claims, for protocols with claims of
    /// their own (Mercure's `mercure` claim).
    pub fn verify_claims(&self, token: &str) -> Result<Map<String, Value>, AuthError> {
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| self.error(e.kind()))?;
        Ok(data.claims)
    }

    /// Checks `token` and reads what it grants.
    pub fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        let claims = self.verify_claims(token)?;
        Ok(Grant {
            subject: claims.get("sub").and_then(Value::as_str).map(str::to_owned),
            topics: patterns(&claims, &self.topics_claim)?,
            publish: patterns(&claims, &self.publish_claim)?,
            expires_at: claims.get("exp").and_then(Value::as_u64),
        })
    }

    fn error(&self, kind: &ErrorKind) -> AuthError {
        match kind {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm
            | ErrorKind::MissingAlgorithm
            | ErrorKind::InvalidAlgorithmName
            | ErrorKind::UnsupportedAlgorithm
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidEddsaKey
            | ErrorKind::InvalidKeyFormat => AuthError::Algorithm(self.algorithm),
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidIssuer => AuthError::Issuer,
            ErrorKind::InvalidAudience => AuthError::Audience,
            ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
            ErrorKind::InvalidClaimFormat(c) => {
                AuthError::Claim(c.clone(), "has the wrong type".into())
            }
            // Bad base64, JSON or shape, `alg: none` (not an algorithm the
            // library knows) and anything newer.
            _ => AuthError::Malformed,
        }
    }
}

/// A topic claim: absent is no topics; otherwise an array of names and
/// `prefix*` patterns.
fn patterns(claims: &Map<String, Value>, name: &str) -> Result<TopicPatterns, AuthError> {
    let bad = |why: String| AuthError::Claim(name.to_owned(), why);
    let items = match claims.get(name) {
        None => return Ok(TopicPatterns::default()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(bad("is not an array of strings".into())),
    };
    let names: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
    let names = names.ok_or_else(|| bad("is not an array of strings".into()))?;
    TopicPatterns::parse(names).map_err(|e| bad(e.to_string()))
}

/// HS256 tokens and verifiers for the tests of every plane that takes JWTs.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    /// A verifier of HS256 tokens signed with `secret`, with `options`.
    pub(crate) fn hs256_verifier(secret: &str, options: JwtOptions) -> Verifier {
        Verifier::new(&JwtOptions {
            secret: Some(Secret::new(secret)),
            ..options
        })
        .unwrap()
        .unwrap()
    }

    /// `claims` signed with HS256 and `secret`.
    pub(crate) fn hs256_sign(secret: &str, claims: &Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{hs256_sign, hs256_verifier};
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn hs(options: JwtOptions) -> Verifier {
        hs256_verifier(SECRET, options)
    }

    fn sign(claims: Value) -> String {
        hs256_sign(SECRET, &claims)
    }

    #[test]
    fn reads_the_grant() {
        let v = hs(JwtOptions::default());
        let exp = now() + 60;
        let g = v
            .verify(&sign(
                json!({"exp": exp, "sub": "svc", "topics": ["a", "b.*"], "publish": ["p"]}),
            ))
            .unwrap();
        assert_eq!(g.subject.as_deref(), Some("svc"));
        assert!(g.topics.allows("a") && g.topics.allows("b.c") && !g.topics.allows("c"));
        assert!(g.publish.allows("p") && !g.publish.allows("a"));
        assert_eq!(g.expires_at, Some(exp));
        let g = v.verify(&sign(json!({"exp": exp}))).unwrap();
        assert!(g.topics.is_empty() && g.publish.is_empty());
    }

    #[test]
    fn refuses_bad_tokens_with_a_reason() {
        let v = hs(JwtOptions {
            issuer: Some("issuer".into()),
            audience: Some("aud".into()),
            leeway: Duration::ZERO,
            ..JwtOptions::default()
        });
        let ok = json!({"exp": now() + 60, "iss": "issuer", "aud": "aud"});
        assert!(v.verify(&sign(ok.clone())).is_ok());
        let with = |k: &str, val: Value| {
            let mut c = ok.clone();
            c[k] = val;
            v.verify(&sign(c)).unwrap_err()
        };
        assert_eq!(with("exp", json!(now() - 5)), AuthError::Expired);
        assert_eq!(with("nbf", json!(now() + 60)), AuthError::NotYetValid);
        assert_eq!(with("iss", json!("other")), AuthError::Issuer);
        assert_eq!(with("aud", json!("other")), AuthError::Audience);
        assert!(matches!(with("topics", json!("a")), AuthError::Claim(..)));
        assert!(matches!(
            with("topics", json!(["a b"])),
            AuthError::Claim(..)
        ));
        let mut no_exp = ok.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            v.verify(&sign(no_exp)).unwrap_err(),
            AuthError::MissingClaim("exp".into())
        );
        assert_eq!(v.verify("not.a.jwt").unwrap_err(), AuthError::Malformed);
        assert_eq!(v.verify("").unwrap_err(), AuthError::Malformed);
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &ok,
            &EncodingKey::from_secret(b"another secret, also 32 bytes long"),
        )
        .unwrap();
        assert_eq!(v.verify(&forged).unwrap_err(), AuthError::BadSignature);
        let other = encode(
            &Header::new(Algorithm::HS384),
            &json!({"exp": now() + 60}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(v.verify(&other).unwrap_err(), AuthError::Algorithm("HS256"));
    }

    #[test]
    fn key_configuration_is_checked() {
        let short = JwtOptions {
            secret: Some(Secret::new("short")),
            ..JwtOptions::default()
        };
        assert!(matches!(Verifier::new(&short), Err(KeyError::ShortSecret)));
        let both = JwtOptions {
            secret: Some(Secret::new(SECRET)),
            public_key: Some(b"x".to_vec()),
            ..JwtOptions::default()
        };
        assert!(matches!(Verifier::new(&both), Err(KeyError::Both)));
        let junk = JwtOptions {
            public_key: Some(b"not a pem".to_vec()),
            ..JwtOptions::default()
        };
        assert!(matches!(Verifier::new(&junk), Err(KeyError::Pem)));
        assert!(Verifier::new(&JwtOptions::default()).unwrap().is_none());
    }
}
