//! The client side of authentication: every call a kormlm client makes (worker daemons, the
//! `coordinator status|…` commands) carries the shared secret in the `x-kormlm-token` metadata,
//! where the coordinator's one authentication layer checks it.

use crate::TOKEN_METADATA;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("the token must be printable ASCII without spaces at either end")]
pub struct InvalidToken;

/// Adds the token (when there is one) to every request of a client.
#[derive(Debug, Clone, Default)]
pub struct TokenInterceptor {
    token: Option<MetadataValue<Ascii>>,
}

impl TokenInterceptor {
    pub fn new(token: Option<&str>) -> Result<Self, InvalidToken> {
        let token = match token {
            Some(t) if t.trim() != t || t.is_empty() => return Err(InvalidToken),
            Some(t) => Some(t.parse().map_err(|_| InvalidToken)?),
            None => None,
        };
        Ok(Self { token })
    }
}

impl Interceptor for TokenInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.token {
            request.metadata_mut().insert(TOKEN_METADATA, token.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_token_when_there_is_one() {
        let mut with = TokenInterceptor::new(Some("s3cret")).unwrap();
        let request = with.call(tonic::Request::new(())).unwrap();
        assert_eq!(request.metadata().get(TOKEN_METADATA).unwrap(), "s3cret");
        let mut without = TokenInterceptor::new(None).unwrap();
        assert!(without
            .call(tonic::Request::new(()))
            .unwrap()
            .metadata()
            .get(TOKEN_METADATA)
            .is_none());
        assert_eq!(TokenInterceptor::new(Some("bad\ntoken")).unwrap_err(), InvalidToken);
        assert_eq!(TokenInterceptor::new(Some(" padded")).unwrap_err(), InvalidToken);
    }
}
