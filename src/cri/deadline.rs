//! Client deadlines (`grpc-timeout`) answered with DEADLINE_EXCEEDED, as
//! gRPC clients and critest expect; tonic's own handling answers CANCELLED.
//! The header is taken off the request so tonic's timeout never fires first.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::Status;
use tonic::codegen::http;
use tower::{Layer, Service};

#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
}

/// Parses a `grpc-timeout` value: digits and a unit (H, M, S, m, u, n).
fn parse_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Deadline<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let timeout = req
            .headers_mut()
            .remove("grpc-timeout")
            .and_then(|v| v.to_str().ok().and_then(parse_timeout));
        let call = self.inner.call(req);
        Box::pin(async move {
            match timeout {
                None => call.await,
                Some(limit) => match tokio::time::timeout(limit, call).await {
                    Ok(result) => result,
                    Err(_) => Ok(Status::deadline_exceeded(format!(
                        "the client's deadline of {limit:?} passed"
                    ))
                    .into_http()),
                },
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_timeout("1m"), Some(Duration::from_millis(1)));
        assert_eq!(parse_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout("5x"), None);
        assert_eq!(parse_timeout("m"), None);
        assert_eq!(parse_timeout("123456789S"), None);
    }

    #[tokio::test]
    async fn a_passed_deadline_answers_deadline_exceeded_and_hides_the_header() {
        let slow = tower::service_fn(|req: http::Request<()>| async move {
            assert!(
                req.headers().get("grpc-timeout").is_none(),
                "header removed"
            );
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
        });
        let mut svc = DeadlineLayer.layer(slow);
        let req = http::Request::builder()
            .header("grpc-timeout", "20m")
            .body(())
            .expect("request");
        let res = svc.call(req).await.expect("response");
        let code = res
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok());
        assert_eq!(code, Some("4"), "DEADLINE_EXCEEDED");
    }
}
