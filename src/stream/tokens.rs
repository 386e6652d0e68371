//! Single-use tokens naming a prepared streaming request: made by the Exec,
//! Attach and PortForward RPCs, redeemed once by the client that opens the
//! URL, and gone after a minute if nobody does.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};

/// How long a token waits for its client (kubelet's streaming cache TTL).
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Most tokens waiting at once (kubelet's MaxInFlight).
pub const MAX_TOKENS: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("too many streaming requests in flight ({MAX_TOKENS}); try again shortly")]
    Full,
    #[error("no randomness for a token")]
    Random,
}

/// Requests by token, each with its deadline.
pub struct Tokens<T> {
    random: SystemRandom,
    entries: Mutex<HashMap<String, (Instant, T)>>,
    ttl: Duration,
}

impl<T> Tokens<T> {
    pub fn new(ttl: Duration) -> Tokens<T> {
        Tokens {
            random: SystemRandom::new(),
            entries: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    /// Stores `request`; returns its new token (URL-safe, 128 random bits).
    pub fn insert(&self, request: T) -> Result<String, TokenError> {
        let mut bytes = [0u8; 16];
        self.random
            .fill(&mut bytes)
            .map_err(|_| TokenError::Random)?;
        let token = hex::encode(bytes);
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, (deadline, _)| *deadline > now);
        if entries.len() >= MAX_TOKENS {
            return Err(TokenError::Full);
        }
        entries.insert(token.clone(), (now + self.ttl, request));
        Ok(token)
    }

    /// Takes the request of `token`: once, and only before its deadline.
    pub fn redeem(&self, token: &str) -> Option<T> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (deadline, request) = entries.remove(token)?;
        (deadline > Instant::now()).then_some(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_redeemed_once() {
        let tokens = Tokens::new(TOKEN_TTL);
        let token = tokens.insert(7).expect("insert");
        assert_eq!(token.len(), 32);
        assert_eq!(tokens.redeem(&token), Some(7));
        assert_eq!(tokens.redeem(&token), None);
        assert_eq!(tokens.redeem("nonsense"), None);
    }

    #[test]
    fn an_expired_token_is_gone() {
        let tokens = Tokens::new(Duration::ZERO);
        let token = tokens.insert("x").expect("insert");
        assert_eq!(tokens.redeem(&token), None);
    }

    #[test]
    fn tokens_are_bounded() {
        let tokens = Tokens::new(TOKEN_TTL);
        for i in 0..MAX_TOKENS {
            tokens.insert(i).expect("room");
        }
        assert_eq!(tokens.insert(0), Err(TokenError::Full));
    }
}
