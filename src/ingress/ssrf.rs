//! Server-side request forgery protection for event deliveries.
//!
//! `spec.events.callbackUrl` is user input, yet the ingress POSTs to it from
//! inside the cluster. Without a check, anyone who can create an instance
//! could make the ingress talk to the cloud metadata service, the API server
//! or any pod. So callback addresses are judged where it matters, at
//! connection time:
//!
//! - host names go through a resolver that drops forbidden addresses; reqwest
//!   connects to exactly the addresses it returns, so there is no second
//!   lookup a DNS-rebinding server could answer differently;
//! - IP literals never reach a resolver, so [`check_url`] judges them before
//!   sending;
//! - redirects are not followed (a public URL could redirect to a private one).
//!
//! The operator can allow ranges (e.g. an in-cluster receiver) with
//! `--allowed-callback-cidrs`, see [`AddressPolicy::parse`].

use std::error::Error as StdError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Which callback addresses are allowed.
#[derive(Clone, Debug, Default)]
pub struct AddressPolicy {
    /// Ranges the operator explicitly allowed, even if non-public.
    allowed: Vec<IpNet>,
    /// Ranges the operator explicitly denied, even if public (wins over `allowed`).
    denied: Vec<IpNet>,
}

/// The range kind reported for an address in `--denied-callback-cidrs`.
pub const DENIED_RANGE: &str = "denied by the operator's configuration";

/// A callback address that the policy refuses. Its message names the kind of
/// range, never the address: status and logs must not tell a tenant what
/// internal address a name resolves to.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error(
    "the callback address is not allowed ({range} range); use a public address or have the operator allow its CIDR (allowedCallbackCIDRs)"
)]
pub struct ForbiddenAddress {
    pub ip: IpAddr,
    /// The kind of range the address is in, e.g. "loopback" or "private".
    pub range: &'static str,
}

/// Why a callback URL is refused before sending.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CallbackUrlError {
    #[error("callback URL scheme {0:?} is not allowed; use http or https")]
    Scheme(String),
    #[error("callback URL has no host")]
    NoHost,
    #[error(transparent)]
    Forbidden(#[from] ForbiddenAddress),
}

/// Non-public IPv4 ranges (RFC 6890 special-purpose registry), most specific
/// first so that the reported kind is the precise one.
const FORBIDDEN_V4: &[(Ipv4Net, &str)] = &[
    (v4(0, 0, 0, 0, 32), "unspecified"),
    (v4(0, 0, 0, 0, 8), "this network"),
    (v4(10, 0, 0, 0, 8), "private"),
    (v4(100, 64, 0, 0, 10), "shared address space (CGNAT)"),
    (v4(127, 0, 0, 0, 8), "loopback"),
    (v4(169, 254, 0, 0, 16), "link-local"),
    (v4(172, 16, 0, 0, 12), "private"),
    (v4(192, 0, 0, 0, 24), "IETF protocol assignments"),
    (v4(192, 0, 2, 0, 24), "documentation"),
    (v4(192, 88, 99, 0, 24), "6to4 relay anycast (deprecated)"),
    (v4(192, 168, 0, 0, 16), "private"),
    (v4(198, 18, 0, 0, 15), "benchmarking"),
    (v4(198, 51, 100, 0, 24), "documentation"),
    (v4(203, 0, 113, 0, 24), "documentation"),
    (v4(224, 0, 0, 0, 4), "multicast"),
    (v4(255, 255, 255, 255, 32), "broadcast"),
    (v4(240, 0, 0, 0, 4), "reserved"),
];

/// Non-public IPv6 ranges. Prefixes that embed an IPv4 address (mapped,
/// NAT64, 6to4) are not here: they are judged by that address instead.
const FORBIDDEN_V6: &[(Ipv6Net, &str)] = &[
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified"),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback"),
    (
        v6([0, 0, 0, 0, 0, 0, 0, 0], 96),
        "IPv4-compatible (deprecated)",
    ),
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), "NAT64 local-use"),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), "discard-only"),
    (
        v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23),
        "IETF protocol assignments (incl. Teredo)",
    ),
    (v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), "documentation"),
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), "documentation"),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "unique local"),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    (
        v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
        "site-local (deprecated)",
    ),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
];

/// Only 2000::/3 is allocated as global unicast; anything else left over
/// after the table above is reserved and has no business being a callback.
const GLOBAL_UNICAST_V6: Ipv6Net = v6([0x2000, 0, 0, 0, 0, 0, 0, 0], 3);

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)
}

const fn v6(s: [u16; 8], len: u8) -> Ipv6Net {
    let ip = Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]);
    Ipv6Net::new_assert(ip, len)
}

impl AddressPolicy {
    pub fn new(allowed: Vec<IpNet>) -> Self {
        AddressPolicy {
            allowed,
            denied: Vec::new(),
        }
    }

    /// Parses two comma/whitespace separated CIDR lists ("10.0.0.0/8, 127.0.0.1/32,
    /// ::1/128"): ranges allowed although non-public, and ranges denied although
    /// public. A bare IP means /32 or /128; an empty list changes nothing.
    pub fn parse(allowed: &str, denied: &str) -> Result<Self, String> {
        Ok(AddressPolicy {
            allowed: parse_cidrs(allowed)?,
            denied: parse_cidrs(denied)?,
        })
    }

    /// The ranges the operator allowed.
    pub fn allowed(&self) -> &[IpNet] {
        &self.allowed
    }

    /// Ok when the address is public or inside an allowed CIDR; Err(ForbiddenAddress) naming the range kind otherwise.
    pub fn check(&self, ip: IpAddr) -> Result<(), ForbiddenAddress> {
        let embedded = embedded_v4(ip);
        // Allowing 127.0.0.0/8 also allows ::ffff:127.0.0.1: it is the same host.
        let within = |nets: &[IpNet]| {
            nets.iter().any(|net| {
                net.contains(&ip) || embedded.is_some_and(|v4| net.contains(&IpAddr::V4(v4)))
            })
        };
        if within(&self.denied) {
            return Err(ForbiddenAddress {
                ip,
                range: DENIED_RANGE,
            });
        }
        let allowed = within(&self.allowed);
        match forbidden_range(ip) {
            Some(range) if !allowed => Err(ForbiddenAddress { ip, range }),
            _ => Ok(()),
        }
    }
}

fn parse_cidrs(list: &str) -> Result<Vec<IpNet>, String> {
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .map(|net| net.trunc())
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("invalid CIDR {s:?} (expected e.g. 10.0.0.0/8 or ::1)"))
        })
        .collect()
}

/// The IPv4 address an IPv6 address stands for, where the kernel or a
/// translator would turn the connection into one to that IPv4 address.
fn embedded_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    let bits = v6.to_bits();
    let low32 = Ipv4Addr::from_bits(bits as u32);
    if let Some(mapped) = v6.to_ipv4_mapped() {
        Some(mapped) // ::ffff:a.b.c.d
    } else if bits >> 32 == 0x0064_ff9b << 64 {
        Some(low32) // NAT64 well-known prefix 64:ff9b::/96 (RFC 6052)
    } else if bits >> 112 == 0x2002 {
        Some(Ipv4Addr::from_bits((bits >> 80) as u32)) // 6to4 2002:AABB:CCDD::/48
    } else {
        None
    }
}

/// The kind of non-public range `ip` is in, or None when it is public.
fn forbidden_range(ip: IpAddr) -> Option<&'static str> {
    if let Some(v4) = embedded_v4(ip) {
        return forbidden_range(IpAddr::V4(v4));
    }
    match ip {
        IpAddr::V4(v4) => FORBIDDEN_V4
            .iter()
            .find(|(net, _)| net.contains(&v4))
            .map(|(_, kind)| *kind),
        IpAddr::V6(v6) => FORBIDDEN_V6
            .iter()
            .find(|(net, _)| net.contains(&v6))
            .map(|(_, kind)| *kind)
            .or_else(|| (!GLOBAL_UNICAST_V6.contains(&v6)).then_some("reserved")),
    }
}

/// Resolves with the system resolver, then keeps only the addresses the
/// policy allows.
struct PolicyResolver {
    policy: Arc<AddressPolicy>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // reqwest passes no port; 0 makes it use the URL's (or the scheme's) port.
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut kept = Vec::with_capacity(resolved.len());
            let mut refused = None;
            for addr in resolved {
                match policy.check(addr.ip()) {
                    Ok(()) => kept.push(addr),
                    Err(forbidden) => {
                        tracing::debug!(%host, %forbidden, "dropping callback address");
                        refused.get_or_insert(forbidden);
                    }
                }
            }
            match refused {
                // Fail with the reason rather than a bare "no addresses", so the
                // caller can tell a forbidden callback from an unreachable one.
                Some(forbidden) if kept.is_empty() => Err(forbidden.into()),
                _ => Ok(Box::new(kept.into_iter()) as Addrs),
            }
        })
    }
}

/// A reqwest client for callback deliveries: resolves names with a resolver that drops forbidden
/// addresses (and fails when none is left, with the ForbiddenAddress in the error chain), never follows
/// redirects, uses `timeout` for the whole request.
///
/// IP-literal hosts bypass the resolver: call [`check_url`] before every request.
pub fn callback_client(
    policy: AddressPolicy,
    timeout: Duration,
) -> Result<reqwest::Client, reqwest::Error> {
    crate::tls::install_crypto_provider();
    reqwest::Client::builder()
        .dns_resolver(PolicyResolver {
            policy: Arc::new(policy),
        })
        // A proxy would be resolved instead of the callback host, bypassing the check.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .user_agent(concat!("dropbox-operator/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Checks a callback URL before sending: scheme http/https, and if the host is an IP literal
/// (reqwest does not call the resolver for those, e.g. http://127.0.0.1/ or http://[::1]/),
/// checks it with the policy. Host names are checked by [`callback_client`]'s resolver.
pub fn check_url(policy: &AddressPolicy, url: &url::Url) -> Result<(), CallbackUrlError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(CallbackUrlError::Scheme(url.scheme().to_owned()));
    }
    // `url` already normalised odd IPv4 spellings (http://2130706433/, http://0x7f.1/)
    // into Host::Ipv4, so they cannot pass as domain names.
    match url.host() {
        None => Err(CallbackUrlError::NoHost),
        Some(url::Host::Domain(_)) => Ok(()),
        Some(url::Host::Ipv4(ip)) => Ok(policy.check(IpAddr::V4(ip))?),
        Some(url::Host::Ipv6(ip)) => Ok(policy.check(IpAddr::V6(ip))?),
    }
}

/// Finds a ForbiddenAddress anywhere in an error's source chain (for reqwest errors from the resolver),
/// so the caller can report reason CallbackForbidden instead of CallbackUnreachable.
pub fn forbidden_in(err: &(dyn StdError + 'static)) -> Option<ForbiddenAddress> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(forbidden) = e.downcast_ref::<ForbiddenAddress>() {
            return Some(forbidden.clone());
        }
        // io::Error::source() skips the error it wraps, so look inside explicitly.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && let Some(forbidden) = forbidden_in(inner)
        {
            return Some(forbidden);
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn non_public_addresses_are_refused_by_default() {
        let policy = AddressPolicy::default();
        let cases = [
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("169.254.169.254", "link-local"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "shared address space (CGNAT)"),
            ("fe80::1", "link-local"),
            ("fc00::1", "unique local"),
            ("fd12::1", "unique local"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "this network"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved"),
            ("::ffff:127.0.0.1", "loopback"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("2002:a00:1::1", "private"),
            ("::7f00:1", "IPv4-compatible (deprecated)"),
            ("192.88.99.1", "6to4 relay anycast (deprecated)"),
            ("2001::1", "IETF protocol assignments (incl. Teredo)"),
            ("2001:1ff::1", "IETF protocol assignments (incl. Teredo)"),
            ("4000::1", "reserved"),
        ];
        for (addr, range) in cases {
            let ip = ip(addr);
            assert_eq!(
                policy.check(ip),
                Err(ForbiddenAddress { ip, range }),
                "{addr}"
            );
        }
    }

    #[test]
    fn public_addresses_pass() {
        let policy = AddressPolicy::default();
        for addr in [
            "93.184.216.34",
            "2606:4700::1111",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(policy.check(ip(addr)), Ok(()), "{addr}");
        }
    }

    #[test]
    fn allowed_cidrs_let_their_addresses_through() {
        let policy = AddressPolicy::parse("127.0.0.0/8", "").unwrap();
        assert_eq!(policy.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(policy.check(ip("127.1.2.3")), Ok(()));
        assert_eq!(policy.check(ip("::ffff:127.0.0.1")), Ok(()));
        assert!(policy.check(ip("10.0.0.1")).is_err());
        assert!(policy.check(ip("::1")).is_err());
    }

    #[test]
    fn parse_accepts_lists_and_bare_ips() {
        let policy = AddressPolicy::parse(
            " 10.0.0.0/8, 127.0.0.1/32 ::1/128,,192.168.1.7 fd00::1 ",
            "",
        )
        .unwrap();
        let expected: Vec<IpNet> = [
            "10.0.0.0/8",
            "127.0.0.1/32",
            "::1/128",
            "192.168.1.7/32",
            "fd00::1/128",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(policy.allowed(), expected.as_slice());
        // Host bits are dropped so the list reads as the ranges it allows.
        let policy = AddressPolicy::parse("10.1.2.3/8", "").unwrap();
        assert_eq!(policy.allowed(), &["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert!(AddressPolicy::parse("", "").unwrap().allowed().is_empty());
    }

    #[test]
    fn denied_ranges_win_and_messages_hide_the_address() {
        let policy = AddressPolicy::parse("10.0.0.0/8", "93.184.0.0/16, 10.9.0.0/16").unwrap();
        assert_eq!(
            policy.check(ip("93.184.216.34")).unwrap_err().range,
            DENIED_RANGE
        );
        assert_eq!(
            policy.check(ip("::ffff:93.184.216.34")).unwrap_err().range,
            DENIED_RANGE
        );
        assert_eq!(
            policy.check(ip("10.9.1.1")).unwrap_err().range,
            DENIED_RANGE
        );
        assert_eq!(policy.check(ip("10.1.1.1")), Ok(()));
        assert_eq!(policy.check(ip("8.8.8.8")), Ok(()));
        let message = policy.check(ip("10.9.1.1")).unwrap_err().to_string();
        assert!(!message.contains("10.9"), "{message}");
    }

    #[test]
    fn parse_reports_errors() {
        for bad in [
            "nonsense",
            "10.0.0.0/33",
            "10.0.0.0/8, 300.1.1.1",
            "::1/129",
            "10.0.0.0/",
        ] {
            let err = AddressPolicy::parse(bad, "").unwrap_err();
            assert!(err.contains("invalid CIDR"), "{bad}: {err}");
        }
    }

    #[test]
    fn check_url_refuses_ip_literals_and_bad_schemes() {
        let policy = AddressPolicy::default();
        let check = |s: &str| check_url(&policy, &url::Url::parse(s).unwrap());
        for url in [
            "http://127.0.0.1/",
            "http://[::1]:8080/x",
            "https://169.254.169.254/latest/meta-data/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://[::ffff:10.0.0.1]/",
        ] {
            assert!(
                matches!(check(url), Err(CallbackUrlError::Forbidden(_))),
                "{url}"
            );
        }
        assert_eq!(
            check("ftp://example.com/"),
            Err(CallbackUrlError::Scheme("ftp".into()))
        );
        assert!(check("file:///etc/passwd").is_err());
        assert_eq!(check("https://example.com/hook"), Ok(()));
        assert_eq!(check("http://93.184.216.34/"), Ok(()));
        let allowed = AddressPolicy::parse("127.0.0.0/8", "").unwrap();
        assert_eq!(
            check_url(&allowed, &url::Url::parse("http://127.0.0.1:9/").unwrap()),
            Ok(())
        );
    }

    #[test]
    fn forbidden_in_looks_through_io_errors() {
        let forbidden = ForbiddenAddress {
            ip: ip("127.0.0.1"),
            range: "loopback",
        };
        let io = std::io::Error::other(forbidden.clone());
        assert_eq!(forbidden_in(&io), Some(forbidden));
        assert_eq!(forbidden_in(&std::io::Error::other("nope")), None);
    }

    #[tokio::test]
    async fn client_refuses_resolved_loopback_and_follows_no_redirects() {
        use axum::{Router, http::StatusCode, http::header::LOCATION, routing::get};

        let app = Router::new().route("/", get(|| async { "ok" })).route(
            "/redirect",
            get(|| async { (StatusCode::FOUND, [(LOCATION, "/")]) }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let timeout = Duration::from_secs(5);

        // Default policy: localhost resolves to loopback only, so the resolver refuses.
        let client = callback_client(AddressPolicy::default(), timeout).unwrap();
        let err = client
            .get(format!("http://localhost:{port}/"))
            .send()
            .await
            .unwrap_err();
        let forbidden = forbidden_in(&err).unwrap_or_else(|| panic!("not forbidden: {err:?}"));
        assert_eq!(forbidden.range, "loopback");
        assert!(forbidden.ip.is_loopback());

        // Allowed loopback: the same request goes through.
        let policy = AddressPolicy::parse("127.0.0.0/8,::1/128", "").unwrap();
        let client = callback_client(policy, timeout).unwrap();
        let resp = client
            .get(format!("http://localhost:{port}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::OK);
        assert_eq!(resp.text().await.unwrap(), "ok");

        // Redirects are handed back, not followed.
        let resp = client
            .get(format!("http://localhost:{port}/redirect"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::FOUND);

        server.abort();
    }
}
