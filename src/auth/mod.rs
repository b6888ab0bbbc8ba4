//! Authentication and access control: who a request or connection is ([`Principal`], from a
//! JWT bearer token), what it may read and write ([`rules`]), and which documents it may see
//! ([`acl`], folded into query filters before registration so that the grid itself never
//! hands a document to someone who may not read it).
//!
//! Tokens are JWTs signed with HS256 (a shared secret, `--auth-secret`) or RS256/ES256 (a
//! public key in PEM, `--auth-public-key`). Claims: `sub` (the user), `roles` (a list of
//! names), `exp` (required; expired tokens are refused, and live subscriptions opened with a
//! token end with `unauthorized` when it expires). Without any key configured, livegrid runs
//! without authentication: every request is anonymous and everything is allowed.

pub mod acl;
pub mod rules;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

pub use rules::{Access, Rules};

/// Who is asking.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Principal {
    /// The user (`sub`); `None` for an anonymous request.
    pub user: Option<String>,
    /// The token's roles.
    pub roles: Vec<String>,
    /// When the token expires (seconds since the Unix epoch); `None` for anonymous.
    pub expires: Option<u64>,
    /// The service acting for this user, when it is one (see the `as` of `subscribe`).
    pub via: Option<String>,
}

impl Principal {
    /// An anonymous principal.
    pub fn anonymous() -> Self {
        Principal::default()
    }

    /// Whether it proved who it is.
    pub fn is_authenticated(&self) -> bool {
        self.user.is_some()
    }

    /// Whether it has role `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// How long until its token expires (`None`: never, anonymous).
    pub fn expires_in(&self) -> Option<Duration> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        self.expires.map(|exp| Duration::from_secs(exp.saturating_sub(now)))
    }

    /// What resume tokens are bound to: the user (and the service acting for it), or nothing.
    pub fn binding(&self) -> Option<String> {
        match (&self.user, &self.via) {
            (Some(user), Some(service)) => Some(format!("{user} via {service}")),
            (user, _) => user.clone(),
        }
    }
}

/// A token that does not prove anything.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Not a valid token: bad signature, expired, wrong algorithm, missing claims.
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    /// The token's algorithm has no key configured.
    #[error("tokens signed with {0:?} are not accepted here")]
    Algorithm(Algorithm),
    /// A token without `sub`.
    #[error("invalid token: it names no user (sub)")]
    NoSubject,
    /// A key given in the configuration is unusable.
    #[error("the auth public key is not an RSA or EC public key in PEM: {0}")]
    Key(#[source] jsonwebtoken::errors::Error),
}

/// The claims livegrid reads.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    exp: u64,
}

/// Checks bearer tokens.
pub struct Authenticator {
    secret: Option<DecodingKey>,
    public: Option<(DecodingKey, Algorithm)>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("hs256", &self.secret.is_some())
            .field("public_key", &self.public.as_ref().map(|(_, alg)| *alg))
            .finish()
    }
}

impl Authenticator {
    /// An authenticator for HS256 tokens signed with `secret` and/or RS256/ES256 tokens
    /// checked with `public_key_pem`. `None` when neither is given (no authentication).
    pub fn new(secret: Option<&str>, public_key_pem: Option<&str>) -> Result<Option<Self>, AuthError> {
        let public = match public_key_pem {
            Some(pem) => Some(match DecodingKey::from_rsa_pem(pem.as_bytes()) {
                Ok(key) => (key, Algorithm::RS256),
                Err(_) => (DecodingKey::from_ec_pem(pem.as_bytes()).map_err(AuthError::Key)?, Algorithm::ES256),
            }),
            None => None,
        };
        let secret = secret.map(|s| DecodingKey::from_secret(s.as_bytes()));
        Ok((secret.is_some() || public.is_some()).then_some(Authenticator { secret, public }))
    }

    /// The principal a token proves.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token)?;
        let key = match (header.alg, &self.secret, &self.public) {
            (Algorithm::HS256, Some(secret), _) => secret,
            (alg, _, Some((public, expected))) if alg == *expected => public,
            (alg, _, _) => return Err(AuthError::Algorithm(alg)),
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = 5;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)?.claims;
        let user = claims.sub.filter(|s| !s.is_empty()).ok_or(AuthError::NoSubject)?;
        Ok(Principal { user: Some(user), roles: claims.roles, expires: Some(claims.exp), via: None })
    }
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    fn token(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()))
            .unwrap()
    }

    fn later() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 3600
    }

    #[test]
    fn es256_tokens_are_checked_with_the_public_key() {
        let issuer = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let auth = Authenticator::new(None, Some(&issuer.public_key_pem())).unwrap().unwrap();
        let key = EncodingKey::from_ec_pem(issuer.serialize_pem().as_bytes()).unwrap();
        let claims = json!({"sub": "carol", "roles": ["service"], "exp": later()});
        let token = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &key).unwrap();
        let principal = auth.verify(&token).unwrap();
        assert_eq!((principal.user.as_deref(), principal.has_role("service")), (Some("carol"), true));
        // Another issuer's key, or an HS256 token where only the public key is configured.
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let forged = EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).unwrap();
        assert!(auth.verify(&jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &forged).unwrap()).is_err());
        assert!(matches!(auth.verify(&self::token("any secret", claims)), Err(AuthError::Algorithm(Algorithm::HS256))));
        assert!(matches!(Authenticator::new(None, Some("not a key")), Err(AuthError::Key(_))));
    }

    #[test]
    fn hs256_tokens_prove_their_claims_and_nothing_else_does() {
        assert!(Authenticator::new(None, None).unwrap().is_none());
        let auth = Authenticator::new(Some("s3cret"), None).unwrap().unwrap();
        let principal =
            auth.verify(&token("s3cret", json!({"sub": "alice", "roles": ["editor"], "exp": later()}))).unwrap();
        assert_eq!(principal.user.as_deref(), Some("alice"));
        assert!(principal.has_role("editor") && !principal.has_role("admin"));
        assert!(principal.expires_in().unwrap() > Duration::from_secs(3500));
        // Another secret, expired, no subject, no expiry, not a token, another algorithm.
        assert!(auth.verify(&token("other", json!({"sub": "alice", "exp": later()}))).is_err());
        assert!(auth.verify(&token("s3cret", json!({"sub": "alice", "exp": 1000}))).is_err());
        assert!(matches!(auth.verify(&token("s3cret", json!({"exp": later()}))), Err(AuthError::NoSubject)));
        assert!(auth.verify(&token("s3cret", json!({"sub": "alice"}))).is_err());
        assert!(auth.verify("not.a.token").is_err());
        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &json!({"sub": "alice", "exp": later()}),
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert!(matches!(auth.verify(&hs384), Err(AuthError::Algorithm(Algorithm::HS384))));
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
    }
}
