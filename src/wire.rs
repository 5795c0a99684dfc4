//! One JSON document per line: the framing of the API socket and of peer requests.

use anyhow::Context;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Reads one message of at most `limit` bytes (newline included). Each caller sizes the limit
/// to what it expects: a longer line is an error, not a reason to grow without bound.
pub async fn read<T: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    limit: usize,
) -> anyhow::Result<T> {
    let mut line = String::new();
    let n = (&mut *reader)
        .take(limit as u64)
        .read_line(&mut line)
        .await?;
    if n == 0 {
        return Err(Closed.into());
    }
    anyhow::ensure!(
        line.ends_with('\n'),
        "message longer than {limit} bytes or cut short"
    );
    serde_json::from_str(&line).context("malformed message")
}

/// The other side closed the connection before a message arrived.
#[derive(Debug, thiserror::Error)]
#[error("connection closed before a message arrived")]
pub struct Closed;

pub async fn write<T: Serialize, W: AsyncWrite + Unpin>(
    writer: &mut W,
    value: &T,
) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    writer.write_all(&line).await?;
    writer.flush().await?;
    Ok(())
}
