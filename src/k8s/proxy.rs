//! Which proxy the API-server connection goes through, chosen as kubectl (client-go) does.
//!
//! - The kubeconfig cluster's `proxy-url` wins, and `NO_PROXY` does not apply to it
//!   (client-go `tools/clientcmd/client_config.go`: `parseProxyURL` accepts only `http`,
//!   `https` and `socks5`, and the result becomes `rest.Config.Proxy`).
//! - Without one, the environment, as Go's `http.ProxyFromEnvironment`
//!   (`golang.org/x/net/http/httpproxy`): `HTTPS_PROXY` for an `https://` server, `HTTP_PROXY`
//!   for `http://` (upper case first), skipped when `NO_PROXY` matches the server's host and
//!   never used for `localhost` or a loopback address. A scheme-less value means `http://`.
//!   (kube's own loader reads only `HTTPS_PROXY`, matches `NO_PROXY` against the proxy
//!   rather than the server and rejects an empty `NO_PROXY` entry, so it is not used:
//!   `k8s::connect` hides `proxy-url` from it.)
//!
//! Credentials in the URL (`http://user:pass@proxy:3128`) become a Basic `Proxy-Authorization`
//! for http(s) proxies and the SOCKS5 username/password, percent-decoded. They never appear in
//! messages: a proxy is shown as `scheme://host:port`. Default ports are Go's: 80, 443, 1080.

use http::{HeaderValue, Uri};
use hyper_util::client::proxy::matcher::Matcher;

/// A proxy URL that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a URL at all.
    #[error("{origin} is not a proxy URL (expected e.g. http://proxy.example:3128)")]
    Parse {
        /// `the kubeconfig's proxy-url` or the environment variable.
        origin: &'static str,
    },
    /// A scheme kubectl does not support either.
    #[error("{origin} {shown}: unsupported scheme \"{scheme}\", must be http, https, or socks5")]
    Scheme {
        /// `the kubeconfig's proxy-url` or the environment variable.
        origin: &'static str,
        /// The proxy without credentials.
        shown: String,
        /// The scheme given.
        scheme: String,
    },
}

/// How to talk to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Plain TCP to the proxy, then `CONNECT host:port`.
    Http,
    /// TLS to the proxy (verified like the API server, as Go's `net/http` does), then `CONNECT`.
    Https,
    /// SOCKS5; the proxy resolves host names.
    Socks5,
}

/// A proxy to reach the API server through.
#[derive(Clone)]
pub struct Proxy {
    /// The protocol.
    pub kind: Kind,
    /// `scheme://host:port/`, without credentials.
    pub uri: Uri,
    /// `Proxy-Authorization` for http(s) proxies, from the URL's userinfo.
    pub basic_auth: Option<HeaderValue>,
    /// SOCKS5 username and password, from the URL's userinfo.
    pub socks_auth: Option<(String, String)>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Credentials are never printed.
        f.debug_struct("Proxy")
            .field("kind", &self.kind)
            .field("uri", &shown(&self.uri))
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&shown(&self.uri))
    }
}

/// The proxy for `server`: the kubeconfig's `proxy_url` if set, else the environment's.
pub fn select(kubeconfig_proxy: Option<&str>, server: &Uri) -> Result<Option<Proxy>, Error> {
    if let Some(raw) = kubeconfig_proxy.filter(|s| !s.trim().is_empty()) {
        let origin = "the kubeconfig's proxy-url";
        let kind = kind_of(raw, origin, false)?;
        let matcher = Matcher::builder().all(raw.trim().to_owned()).build();
        return build(kind, origin, matcher, server).map(Some);
    }
    let server_host = server.host().unwrap_or_default();
    if is_loopback(server_host) {
        return Ok(None);
    }
    let (origin, raw) = match server.scheme_str() {
        Some("http") => first_env(&["HTTP_PROXY", "http_proxy"]),
        _ => first_env(&["HTTPS_PROXY", "https_proxy"]),
    };
    let Some(raw) = raw else { return Ok(None) };
    let kind = kind_of(&raw, origin, true)?;
    let no = first_env(&["NO_PROXY", "no_proxy"]).1.unwrap_or_default();
    let matcher = Matcher::builder()
        .http(raw.clone())
        .https(raw)
        .no(no)
        .build();
    if matcher.intercept(server).is_none() {
        return Ok(None); // NO_PROXY matched the server
    }
    build(kind, origin, matcher, server).map(Some)
}

/// The protocol `raw` names. `env`: a missing scheme means http (Go's `httpproxy`), and
/// `socks5h` is accepted as well.
fn kind_of(raw: &str, origin: &'static str, env: bool) -> Result<Kind, Error> {
    let uri: Uri = raw.trim().parse().map_err(|_| Error::Parse { origin })?;
    if uri.host().is_none() && !(env && uri.scheme().is_none()) {
        return Err(Error::Parse { origin });
    }
    match uri.scheme_str() {
        Some("http") => Ok(Kind::Http),
        None if env => Ok(Kind::Http),
        Some("https") => Ok(Kind::Https),
        Some("socks5") => Ok(Kind::Socks5),
        Some("socks5h") if env => Ok(Kind::Socks5),
        None => Err(Error::Parse { origin }),
        Some(other) => Err(Error::Scheme {
            origin,
            shown: shown(&uri),
            scheme: other.to_owned(),
        }),
    }
}

/// The proxy `matcher` picks for `server`, with Go's default port made explicit.
fn build(kind: Kind, origin: &'static str, matcher: Matcher, server: &Uri) -> Result<Proxy, Error> {
    let intercept = matcher.intercept(server).ok_or(Error::Parse { origin })?;
    let uri = intercept.uri();
    let port = uri.port_u16().unwrap_or(match kind {
        Kind::Http => 80,
        Kind::Https => 443,
        Kind::Socks5 => 1080,
    });
    let host = uri.host().ok_or(Error::Parse { origin })?;
    let scheme = match kind {
        Kind::Http => "http",
        Kind::Https => "https",
        Kind::Socks5 => "socks5",
    };
    let uri = format!("{scheme}://{host}:{port}/")
        .parse()
        .map_err(|_| Error::Parse { origin })?;
    Ok(Proxy {
        kind,
        uri,
        basic_auth: intercept.basic_auth().cloned(),
        socks_auth: intercept
            .raw_auth()
            .map(|(user, pass)| (user.to_owned(), pass.to_owned())),
    })
}

/// `scheme://host:port` without credentials or path.
fn shown(uri: &Uri) -> String {
    let host = uri.host().unwrap_or_default();
    let scheme = uri
        .scheme_str()
        .map(|s| format!("{s}://"))
        .unwrap_or_default();
    match uri.port_u16() {
        Some(port) => format!("{scheme}{host}:{port}"),
        None => format!("{scheme}{host}"),
    }
}

/// `localhost` or a loopback address: Go's `httpproxy` never proxies these.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The first of `names` that is set and not empty, with its name.
fn first_env(names: &[&'static str]) -> (&'static str, Option<String>) {
    for name in names {
        if let Some(v) = std::env::var(name).ok().filter(|v| !v.trim().is_empty()) {
            return (name, Some(v));
        }
    }
    (names[0], None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> Uri {
        "https://api.example:6443".parse().unwrap()
    }

    #[test]
    fn kubeconfig_schemes_and_default_ports() {
        for (raw, kind, uri) in [
            ("http://p.example", Kind::Http, "http://p.example:80/"),
            ("https://p.example", Kind::Https, "https://p.example:443/"),
            (
                "socks5://p.example",
                Kind::Socks5,
                "socks5://p.example:1080/",
            ),
            (
                "http://p.example:3128",
                Kind::Http,
                "http://p.example:3128/",
            ),
        ] {
            let p = select(Some(raw), &server()).unwrap().unwrap();
            assert_eq!(p.kind, kind, "{raw}");
            assert_eq!(p.uri.to_string(), uri, "{raw}");
            assert!(p.basic_auth.is_none() && p.socks_auth.is_none());
        }
    }

    #[test]
    fn credentials_are_decoded_and_never_shown() {
        let p = select(Some("http://al%40ice:s3cr%3At@p.example:3128"), &server())
            .unwrap()
            .unwrap();
        // base64("al@ice:s3cr:t")
        assert_eq!(p.basic_auth.unwrap(), "Basic YWxAaWNlOnMzY3I6dA==");
        let p = select(Some("socks5://bob:pw@p.example:1080"), &server())
            .unwrap()
            .unwrap();
        assert_eq!(p.socks_auth, Some(("bob".into(), "pw".into())));
        assert!(!format!("{p} {p:?}").contains("pw"), "{p:?}");
    }

    #[test]
    fn unsupported_scheme_is_one_line_without_credentials() {
        for raw in [
            "socks4://u:secret@p.example:1080",
            "socks5h://u:secret@p.example",
        ] {
            let e = select(Some(raw), &server()).unwrap_err().to_string();
            assert!(e.contains("unsupported scheme"), "{e}");
            assert!(e.contains("must be http, https, or socks5"), "{e}");
            assert!(!e.contains("secret") && !e.contains('\n'), "{e}");
        }
        assert!(matches!(
            select(Some("p.example:3128"), &server()),
            Err(Error::Parse { .. })
        ));
    }

    #[test]
    fn loopback_servers_never_use_the_environment() {
        for host in ["localhost", "127.0.0.1", "[::1]", "127.3.4.5"] {
            assert!(is_loopback(
                format!("https://{host}:6443")
                    .parse::<Uri>()
                    .unwrap()
                    .host()
                    .unwrap()
            ));
        }
        assert!(!is_loopback("10.0.0.1"));
        assert!(!is_loopback("api.example"));
    }
}
