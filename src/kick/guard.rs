//! The SSRF guard every KICK driver goes through: a client names a URL or address, and the server
//! must not become its way into the server's own network.
//!
//! * Only `http` and `https`; `http` only for targets inside the driver's `allow` CIDRs.
//! * Loopback, private, shared (CGNAT), link-local, multicast, unspecified, reserved and
//!   documentation addresses, their IPv4-mapped / IPv4-compatible / 6to4 / NAT64 forms, and the
//!   cloud metadata addresses are refused unless inside `allow`.
//! * No DNS rebinding: the HTTP clients resolve through [`GuardResolver`], which checks every
//!   address it hands to the connector, so the address checked is the address connected to; URL
//!   hosts that are IP literals (which skip the resolver) are checked before each request.
//!
//! The classification is pure and unit-tested; only [`check_url`] and the resolver touch DNS.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use reqwest::Url;

/// A driver's `allow` list.
#[derive(Debug, Clone, Default)]
pub struct Allow(Vec<IpNet>);

impl Allow {
    /// Parses CIDRs (`10.0.0.0/8`) or bare addresses (taken as one host).
    pub fn parse(list: &[String]) -> Result<Allow, String> {
        list.iter()
            .map(|s| {
                let s = s.trim();
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{s:?} is not a CIDR"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Allow)
    }

    /// Whether `ip`, or the IPv4 address it embeds, is inside the list.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let embedded = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.0
            .iter()
            .any(|net| net.contains(&ip) || embedded.is_some_and(|e| net.contains(&e)))
    }
}

/// What the guard makes of one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Inside the driver's `allow` list: any scheme, private or not.
    Allowed,
    /// A public address: `https` only.
    Public,
    /// Refused, with the kind of address it is.
    Refused(&'static str),
}

/// The verdict on `ip` for a driver whose list is `allow`.
pub fn verdict(ip: IpAddr, allow: &Allow) -> Verdict {
    if allow.contains(ip) {
        Verdict::Allowed
    } else if let Some(kind) = special(ip) {
        Verdict::Refused(kind)
    } else {
        Verdict::Public
    }
}

/// The kind of a non-public address, or `None` for an address on the public Internet.
pub fn special(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b) {
        _ if ip == Ipv4Addr::new(169, 254, 169, 254) => "cloud metadata",
        (0, _) => "unspecified",
        (127, _) => "loopback",
        (10, _) | (192, 168) => "private",
        (172, 16..=31) => "private",
        (100, 64..=127) => "shared (CGNAT)",
        (169, 254) => "link-local",
        (192, 0) if c == 0 || c == 2 => "reserved",
        (198, 18 | 19) => "reserved",
        (198, 51) if c == 100 => "reserved",
        (203, 0) if c == 113 => "reserved",
        (224..=239, _) => "multicast",
        (240..=255, _) => "reserved",
        _ => return None,
    })
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        return Some("cloud metadata");
    }
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if let Some(v4) = embedded_v4(ip) {
        // The same host as its IPv4 address, reached through a translation.
        return special_v4(v4);
    }
    Some(match s[0] {
        0xff00..=0xffff => "multicast",
        0xfe80..=0xfebf => "link-local",
        0xfec0..=0xfeff => "site-local",
        0xfc00..=0xfdff => "private (unique local)",
        0x0000..=0x00ff => "reserved",
        0x0100 if s[1..4] == [0, 0, 0] => "discard",
        0x2001 if s[1] == 0 => "Teredo",
        0x2001 if s[1] == 0xdb8 => "documentation",
        0x2001 if s[1] < 0x200 => "reserved",
        _ => return None,
    })
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`),
/// 6to4 (`2002:AABB:CCDD::/48`) or NAT64 (`64:ff9b::a.b.c.d`) address.
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(low),
        [0, 0, 0, 0, 0, 0, _, _] if !ip.is_unspecified() && !ip.is_loopback() => Some(low),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        )),
        _ => None,
    }
}

/// Why a target is not kicked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Refused(String),
}

/// Checks every address `host` stands for: each must be `Allowed`, or `Public` when `https`.
pub fn check_addrs(addrs: &[IpAddr], https: bool, allow: &Allow) -> Result<(), GuardError> {
    if addrs.is_empty() {
        return Err(GuardError::Invalid("the host does not resolve".into()));
    }
    for &ip in addrs {
        match verdict(ip, allow) {
            Verdict::Allowed => {}
            Verdict::Public if https => {}
            Verdict::Public => {
                return Err(GuardError::Refused(
                    "http:// is accepted only for targets inside the driver's allow list; use https://"
                        .into(),
                ))
            }
            Verdict::Refused(kind) => {
                return Err(GuardError::Refused(format!(
                    "the target resolves to a {kind} address"
                )))
            }
        }
    }
    Ok(())
}

/// Parses a kick URL: `http`/`https`, a host, no user info. Pure.
pub fn parse_url(text: &str) -> Result<Url, GuardError> {
    let url = Url::parse(text).map_err(|e| GuardError::Invalid(format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(GuardError::Invalid("the URL must be http:// or https://".into()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(GuardError::Invalid("the URL has no host".into()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(GuardError::Invalid("the URL must not carry user info".into()));
    }
    Ok(url)
}

/// The address a URL's host names literally, if it is an IP literal.
pub fn literal_ip(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Parses and checks a kick URL, resolving its host (within `timeout`): what `register` runs.
pub async fn check_url(text: &str, allow: &Allow, timeout: Duration) -> Result<Url, GuardError> {
    let url = parse_url(text)?;
    let https = url.scheme() == "https";
    let addrs = match (literal_ip(&url), url.host_str()) {
        (Some(ip), _) => vec![ip],
        (None, Some(host)) => resolve(host, timeout).await?,
        (None, None) => return Err(GuardError::Invalid("the URL has no host".into())),
    };
    check_addrs(&addrs, https, allow)?;
    Ok(url)
}

/// Checks the literal address of a URL before a request (the resolver never sees literals).
pub fn check_literal(url: &Url, allow: &Allow) -> Result<(), GuardError> {
    match literal_ip(url) {
        Some(ip) => check_addrs(&[ip], url.scheme() == "https", allow),
        None => Ok(()),
    }
}

async fn resolve(host: &str, timeout: Duration) -> Result<Vec<IpAddr>, GuardError> {
    let lookup = tokio::net::lookup_host((host, 0));
    match tokio::time::timeout(timeout, lookup).await {
        Ok(Ok(addrs)) => Ok(addrs.map(|a| a.ip()).collect()),
        Ok(Err(_)) => Err(GuardError::Invalid("the host does not resolve".into())),
        Err(_) => Err(GuardError::Invalid("resolving the host timed out".into())),
    }
}

/// A reqwest resolver that refuses names resolving to addresses the guard refuses, so the
/// connector only ever sees checked addresses. One per (driver, scheme): `https` is false for
/// the client that sends to `http://` URLs, which accepts only addresses inside `allow`.
pub struct GuardResolver {
    pub allow: Arc<Allow>,
    pub https: bool,
    pub timeout: Duration,
}

impl reqwest::dns::Resolve for GuardResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let (allow, https, timeout) = (self.allow.clone(), self.https, self.timeout);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = resolve(&host, timeout).await?;
            check_addrs(&addrs, https, &allow)?;
            let sockets: Vec<SocketAddr> = addrs.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect();
            Ok(Box::new(sockets.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The HTTP clients of one driver: redirects never followed, no proxy from the environment
/// (it would connect to an address the guard never saw), every name resolved through the guard.
pub struct Clients {
    http: reqwest::Client,
    https: reqwest::Client,
    pub allow: Arc<Allow>,
}

impl Clients {
    pub fn new(allow: Allow, timeout: Duration) -> Result<Clients, reqwest::Error> {
        let allow = Arc::new(allow);
        let build = |https: bool| {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .timeout(timeout)
                .connect_timeout(timeout)
                .dns_resolver(Arc::new(GuardResolver {
                    allow: allow.clone(),
                    https,
                    timeout,
                }))
                .build()
        };
        Ok(Clients {
            http: build(false)?,
            https: build(true)?,
            allow,
        })
    }

    /// The client for `url`'s scheme, after checking a literal host.
    pub fn for_url(&self, url: &Url) -> Result<&reqwest::Client, GuardError> {
        check_literal(url, &self.allow)?;
        Ok(if url.scheme() == "https" {
            &self.https
        } else {
            &self.http
        })
    }
}

/// Whether a request error came from the guard (a refused address), not from the network.
pub fn is_refusal(error: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.downcast_ref::<GuardError>().is_some() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Reads at most `max` bytes of a response body and drops the rest.
pub async fn read_capped(mut response: reqwest::Response, max: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < max {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = max - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            _ => break,
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn allow(list: &[&str]) -> Allow {
        Allow::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn non_public_addresses_are_refused() {
        let none = Allow::default();
        for refused in [
            "127.0.0.1",
            "127.8.9.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "fc00::1",
            "fd00:ec2::254",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::10.0.0.1",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::",
            "64:ff9b::10.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "2001:db8::1",
        ] {
            assert!(
                matches!(verdict(ip(refused), &none), Verdict::Refused(_)),
                "{refused} must be refused"
            );
        }
        for public in [
            "8.8.8.8",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(verdict(ip(public), &none), Verdict::Public, "{public}");
        }
        assert_eq!(special(ip("169.254.169.254")), Some("cloud metadata"));
        assert_eq!(special(ip("fd00:ec2::254")), Some("cloud metadata"));
    }

    #[test]
    fn allow_overrides_and_covers_mapped_forms() {
        let a = allow(&["127.0.0.1/32", "10.0.0.0/8", "fd00::5"]);
        assert_eq!(verdict(ip("127.0.0.1"), &a), Verdict::Allowed);
        assert_eq!(verdict(ip("::ffff:127.0.0.1"), &a), Verdict::Allowed);
        assert_eq!(verdict(ip("10.9.9.9"), &a), Verdict::Allowed);
        assert_eq!(verdict(ip("fd00::5"), &a), Verdict::Allowed);
        assert!(matches!(
            verdict(ip("127.0.0.2"), &a),
            Verdict::Refused("loopback")
        ));
        assert!(matches!(verdict(ip("fd00::6"), &a), Verdict::Refused(_)));
        assert!(Allow::parse(&["nonsense".into()]).is_err());
    }

    #[test]
    fn http_only_inside_allow_and_https_for_public() {
        let a = allow(&["127.0.0.1/32"]);
        assert!(check_addrs(&[ip("127.0.0.1")], false, &a).is_ok());
        assert!(check_addrs(&[ip("8.8.8.8")], true, &a).is_ok());
        assert!(matches!(
            check_addrs(&[ip("8.8.8.8")], false, &a),
            Err(GuardError::Refused(_))
        ));
        // One bad address among good ones refuses the name.
        assert!(matches!(
            check_addrs(&[ip("8.8.8.8"), ip("10.0.0.1")], true, &a),
            Err(GuardError::Refused(_))
        ));
        assert!(matches!(check_addrs(&[], true, &a), Err(GuardError::Invalid(_))));
    }

    #[test]
    fn urls_are_http_or_https_with_a_host_and_no_user_info() {
        assert!(parse_url("https://push.example.com/x").is_ok());
        for bad in [
            "ftp://example.com/",
            "file:///etc/passwd",
            "https://user:pw@example.com/",
            "not a url",
            "gopher://x",
        ] {
            assert!(matches!(parse_url(bad), Err(GuardError::Invalid(_))), "{bad}");
        }
        let u = parse_url("http://[::1]:8080/").unwrap();
        assert_eq!(literal_ip(&u), Some(ip("::1")));
        assert!(matches!(
            check_literal(&u, &Allow::default()),
            Err(GuardError::Refused(_))
        ));
        assert!(check_literal(&u, &allow(&["::1/128"])).is_ok());
    }

    #[tokio::test]
    async fn names_are_resolved_and_checked() {
        let t = Duration::from_secs(5);
        let refused = check_url("http://localhost:9/", &Allow::default(), t).await;
        assert!(matches!(refused, Err(GuardError::Refused(_))), "{refused:?}");
        let ok = check_url("http://localhost:9/", &allow(&["127.0.0.0/8", "::1/128"]), t).await;
        assert!(ok.is_ok(), "{ok:?}");
    }
}
