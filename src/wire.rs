//! One JSON document per line: the framing of the API socket and of peer requests.

use anyhow::Context;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Requests are small; a longer line is an error, not a reason to grow without bound.
const MAX_LINE: usize = 1 << 20;

pub async fn read<T: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
) -> anyhow::Result<T> {
    let mut line = String::new();
    let n = (&mut *reader)
        .take(MAX_LINE as u64)
        .read_line(&mut line)
        .await?;
    anyhow::ensure!(n > 0, "connection closed before a message arrived");
    anyhow::ensure!(
        line.ends_with('\n'),
        "message longer than {MAX_LINE} bytes or cut short"
    );
    serde_json::from_str(&line).context("malformed message")
}

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
