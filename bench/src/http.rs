//! A minimal HTTP/1.1 client: one keep-alive connection per app server, as real app servers hold.
//! Built on hyper's connection API so no pool or extra task sits between the load and the socket.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::BoxError;

/// One HTTP/1.1 connection.
pub struct HttpConn {
    sender: SendRequest<Full<Bytes>>,
}

impl HttpConn {
    pub async fn connect(addr: SocketAddr) -> Result<HttpConn, BoxError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(HttpConn { sender })
    }

    /// Sends one request and reads the whole answer: (status, body).
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        content_type: Option<&'static str>,
        body: Bytes,
    ) -> Result<(u16, Bytes), BoxError> {
        self.sender.ready().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "127.0.0.1");
        if let Some(ct) = content_type {
            req = req.header(CONTENT_TYPE, ct);
        }
        let resp = self.sender.send_request(req.body(Full::new(body))?).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// `PUT path` with the form body `version=N`; returns the status.
    pub async fn put_version(&mut self, path: &str, version: u64) -> Result<u16, BoxError> {
        let body = Bytes::from(format!("version={version}"));
        let (status, _) = self
            .request(Method::PUT, path, Some("application/x-www-form-urlencoded"), body)
            .await?;
        Ok(status)
    }
}

/// One-off `GET path` on a fresh connection: (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, Bytes), BoxError> {
    HttpConn::connect(addr)
        .await?
        .request(Method::GET, path, None, Bytes::new())
        .await
}
