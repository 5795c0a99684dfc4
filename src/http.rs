//! The one way the daemon serves HTTP/1.1 (the Docker plugin's socket, `/metrics`): hyper on a
//! tokio stream, with a bound on how long a client may take to send its request's headers.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

/// How long a client gets to send its request's headers.
pub const HEADER_WITHIN: Duration = Duration::from_secs(5);

/// Answers the requests of one connection with `handle` until the client closes it; a broken
/// or slow connection is only logged (at debug, under `what`): it is the client's.
pub async fn serve_connection<S, F, Fut>(stream: S, what: &'static str, handle: F)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let answer = handle(request);
        async move { Ok::<_, Infallible>(answer.await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_WITHIN)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(err) = served {
        debug!(%err, "{what} connection ended");
    }
}
