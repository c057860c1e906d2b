//! A minimal HTTP/1.1 client for the Docker API, over any byte stream: one
//! keep-alive connection, requests one at a time, bodies by Content-Length,
//! chunked encoding or EOF. Enough for `/_ping`, `/images/load` and
//! `/images/{name}/get`; not a general client.

use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Something to speak HTTP over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One HTTP/1.1 connection.
pub struct Conn<S: Stream> {
    io: BufReader<S>,
}

/// A response whose body was read (and counted, not kept, when large).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body_len: u64,
    /// The body's first 4 KiB.
    pub head: Vec<u8>,
}

const BUF: usize = 256 * 1024;

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

impl<S: Stream> Conn<S> {
    pub fn new(stream: S) -> Self {
        Self {
            io: BufReader::with_capacity(BUF, stream),
        }
    }

    /// Sends a request with no body and reads the response.
    pub async fn get(&mut self, method: &str, path: &str) -> std::io::Result<Response> {
        let req = format!("{method} {path} HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\n\r\n");
        self.io.get_mut().write_all(req.as_bytes()).await?;
        self.io.get_mut().flush().await?;
        self.response().await
    }

    /// Sends a file as the body of a POST and reads the response.
    pub async fn post_file(&mut self, path: &str, file: &Path) -> std::io::Result<Response> {
        let mut f = tokio::fs::File::open(file).await?;
        let len = f.metadata().await?.len();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/x-tar\r\nContent-Length: {len}\r\n\r\n"
        );
        let w = self.io.get_mut();
        w.write_all(req.as_bytes()).await?;
        let mut buf = vec![0u8; BUF];
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n]).await?;
        }
        w.flush().await?;
        self.response().await
    }

    async fn line(&mut self) -> std::io::Result<String> {
        let mut l = String::new();
        if self.io.read_line(&mut l).await? == 0 {
            return Err(bad("connection closed mid-response"));
        }
        Ok(l.trim_end().to_owned())
    }

    async fn response(&mut self) -> std::io::Result<Response> {
        let status_line = self.line().await?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
        let (mut len, mut chunked) = (None, false);
        loop {
            let h = self.line().await?;
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    len = v.parse::<u64>().ok();
                } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        let mut r = Response {
            status,
            body_len: 0,
            head: Vec::new(),
        };
        if chunked {
            loop {
                let size = self.line().await?;
                let size = u64::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| bad(format!("bad chunk size {size:?}")))?;
                if size == 0 {
                    // Trailers, then the empty line.
                    while !self.line().await?.is_empty() {}
                    break;
                }
                self.body(&mut r, Some(size)).await?;
                self.line().await?;
            }
        } else {
            self.body(&mut r, len).await?;
        }
        Ok(r)
    }

    /// Reads `len` bytes of body (or to EOF), keeping the first 4 KiB.
    async fn body(&mut self, r: &mut Response, len: Option<u64>) -> std::io::Result<()> {
        let mut left = len.unwrap_or(u64::MAX);
        let mut buf = vec![0u8; BUF];
        while left > 0 {
            let want = usize::try_from(left.min(BUF as u64)).unwrap_or(BUF);
            let n = self.io.read(&mut buf[..want]).await?;
            if n == 0 {
                if len.is_some() {
                    return Err(bad("connection closed mid-body"));
                }
                break;
            }
            if r.head.len() < 4096 {
                let keep = n.min(4096 - r.head.len());
                r.head.extend_from_slice(&buf[..keep]);
            }
            r.body_len += n as u64;
            left -= n as u64;
        }
        Ok(())
    }
}
