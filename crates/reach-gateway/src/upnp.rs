//! The UPnP IGD subset the gateway speaks, sans-IO: SSDP discovery
//! answers, the device description, HTTP requests read with bounds, and
//! SOAP actions in and out. Enough for common clients (miniupnpc's
//! `upnpc`, igd-next): discovery, GetExternalIPAddress, AddPortMapping,
//! DeletePortMapping, GetSpecificPortMappingEntry,
//! GetGenericPortMappingEntry, GetStatusInfo, GetConnectionTypeInfo and
//! GetCommonLinkProperties.
//!
//! ```text
//! client --M-SEARCH (UDP 239.255.255.250:1900)--> 200 OK, LOCATION: http://LAN:PORT/rootDesc.xml
//! client --GET /rootDesc.xml--> the device: IGD > WANDevice > WANConnectionDevice > WANIPConnection
//! client --POST /ctl/IPConn, SOAPAction: "urn:...:WANIPConnection:1#AddPortMapping"--> response or fault
//! ```

/// The SSDP multicast group and port.
pub const SSDP_GROUP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(239, 255, 255, 250);
/// The SSDP port.
pub const SSDP_PORT: u16 = 1900;
/// The WANIPConnection service type.
pub const WANIP: &str = "urn:schemas-upnp-org:service:WANIPConnection:1";
/// The WANCommonInterfaceConfig service type.
pub const COMMON: &str = "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1";
/// The WANIPConnection control path.
pub const CONTROL_IP: &str = "/ctl/IPConn";
/// The WANCommonInterfaceConfig control path.
pub const CONTROL_COMMON: &str = "/ctl/CmnIfCfg";
/// The description's path.
pub const DESCRIPTION: &str = "/rootDesc.xml";
/// Longest request head read.
pub const MAX_HEAD: usize = 8192;
/// Longest request body read.
pub const MAX_BODY: usize = 16384;

const IGD: &str = "urn:schemas-upnp-org:device:InternetGatewayDevice:1";
const WAN_DEVICE: &str = "urn:schemas-upnp-org:device:WANDevice:1";
const WAN_CONN_DEVICE: &str = "urn:schemas-upnp-org:device:WANConnectionDevice:1";

/// The search target of an SSDP M-SEARCH, if `datagram` is one.
pub fn search_target(datagram: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(datagram).ok()?;
    let mut lines = text.split("\r\n");
    if !lines.next()?.eq_ignore_ascii_case("M-SEARCH * HTTP/1.1") {
        return None;
    }
    let mut st = None;
    let mut discover = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.trim().eq_ignore_ascii_case("ST") {
            st = Some(value.to_string());
        } else if name.trim().eq_ignore_ascii_case("MAN") {
            discover = value.trim_matches('"') == "ssdp:discover";
        }
    }
    st.filter(|_| discover)
}

/// The answers to a search for `st` by the device `uuid` described at
/// `location` (none if it names nothing the gateway is).
pub fn search_answers(st: &str, location: &str, uuid: &str) -> Vec<String> {
    let ours = [
        "upnp:rootdevice".to_string(),
        format!("uuid:{uuid}"),
        IGD.to_string(),
        WAN_DEVICE.to_string(),
        WAN_CONN_DEVICE.to_string(),
        WANIP.to_string(),
        COMMON.to_string(),
    ];
    ours.iter()
        .filter(|t| st == "ssdp:all" || st == t.as_str())
        .map(|t| {
            let usn = if t.starts_with("uuid:") {
                t.clone()
            } else {
                format!("uuid:{uuid}::{t}")
            };
            format!(
                "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: {t}\r\nUSN: {usn}\r\nEXT:\r\nSERVER: Linux UPnP/1.1 reach-gateway/1\r\nLOCATION: {location}\r\n\r\n"
            )
        })
        .collect()
}

/// The device description.
pub fn description(uuid: &str) -> String {
    format!(
        r#"<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><specVersion><major>1</major><minor>0</minor></specVersion>
<device><deviceType>{IGD}</deviceType><friendlyName>reach gateway</friendlyName><manufacturer>reach</manufacturer><modelName>reach gateway</modelName><UDN>uuid:{uuid}</UDN>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType><serviceId>urn:upnp-org:serviceId:L3Forwarding1</serviceId><controlURL>/ctl/L3F</controlURL><eventSubURL>/evt/L3F</eventSubURL><SCPDURL>/L3F.xml</SCPDURL></service></serviceList>
<deviceList><device><deviceType>{WAN_DEVICE}</deviceType><friendlyName>WAN device</friendlyName><manufacturer>reach</manufacturer><modelName>reach gateway</modelName><UDN>uuid:{uuid}-1</UDN>
<serviceList><service><serviceType>{COMMON}</serviceType><serviceId>urn:upnp-org:serviceId:WANCommonIFC1</serviceId><controlURL>{CONTROL_COMMON}</controlURL><eventSubURL>/evt/CmnIfCfg</eventSubURL><SCPDURL>/WANCfg.xml</SCPDURL></service></serviceList>
<deviceList><device><deviceType>{WAN_CONN_DEVICE}</deviceType><friendlyName>WAN connection</friendlyName><manufacturer>reach</manufacturer><modelName>reach gateway</modelName><UDN>uuid:{uuid}-2</UDN>
<serviceList><service><serviceType>{WANIP}</serviceType><serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><controlURL>{CONTROL_IP}</controlURL><eventSubURL>/evt/IPConn</eventSubURL><SCPDURL>/WANIPCn.xml</SCPDURL></service></serviceList>
</device></deviceList></device></deviceList></device></root>
"#
    )
}

/// An HTTP request, read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// GET, POST.
    pub method: String,
    /// The path.
    pub path: String,
    /// The SOAPAction header, unquoted.
    pub soap_action: Option<String>,
    /// The body.
    pub body: String,
}

/// How far bytes go towards a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parse {
    /// Not all of it yet.
    Incomplete,
    /// A whole request.
    Done(Request),
    /// Not a request this server reads (answered 400 and closed).
    Bad(&'static str),
}

/// Reads a request from the bytes received so far.
pub fn parse_request(buf: &[u8]) -> Parse {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD {
            Parse::Bad("request head too long")
        } else {
            Parse::Incomplete
        };
    };
    if end > MAX_HEAD {
        return Parse::Bad("request head too long");
    }
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Parse::Bad("request head is not UTF-8");
    };
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(path), Some(version)) = (first.next(), first.next(), first.next())
    else {
        return Parse::Bad("bad request line");
    };
    if !version.starts_with("HTTP/1.") {
        return Parse::Bad("not HTTP/1.x");
    }
    let mut length = 0usize;
    let mut soap_action = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Parse::Bad("bad header line");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            match value.parse::<usize>() {
                Ok(n) if n <= MAX_BODY => length = n,
                Ok(_) => return Parse::Bad("body too long"),
                Err(_) => return Parse::Bad("bad content-length"),
            }
        } else if name.eq_ignore_ascii_case("soapaction") {
            soap_action = Some(value.trim_matches('"').to_string());
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Parse::Bad("chunked bodies are not read");
        }
    }
    let body_start = end + 4;
    let Some(body) = buf.get(body_start..body_start + length) else {
        return Parse::Incomplete;
    };
    let Ok(body) = std::str::from_utf8(body) else {
        return Parse::Bad("body is not UTF-8");
    };
    Parse::Done(Request {
        method: method.to_string(),
        path: path.to_string(),
        soap_action,
        body: body.to_string(),
    })
}

/// The value of argument `name` in a SOAP body (`<name>value</name>`,
/// any namespace prefix), entities decoded.
pub fn arg(body: &str, name: &str) -> Option<String> {
    let mut rest = body;
    loop {
        let at = rest.find('<')?;
        rest = &rest[at + 1..];
        let close = rest.find('>')?;
        let tag = &rest[..close];
        let self_closing = tag.ends_with('/');
        let tag_name = tag
            .split(char::is_whitespace)
            .next()
            .unwrap_or_default()
            .trim_end_matches('/');
        if tag_name.rsplit(':').next() == Some(name) {
            if self_closing {
                return Some(String::new());
            }
            let value = &rest[close + 1..];
            let end = value.find("</")?;
            return Some(unescape(&value[..end]));
        }
        rest = &rest[close + 1..];
    }
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A SOAP action's successful answer (a whole HTTP response).
pub fn action_response(service: &str, action: &str, args: &[(&str, String)]) -> String {
    let args: String = args
        .iter()
        .map(|(n, v)| format!("<{n}>{}</{n}>", escape(v)))
        .collect();
    let body = format!(
        r#"<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><u:{action}Response xmlns:u="{service}">{args}</u:{action}Response></s:Body></s:Envelope>"#
    );
    http_response(200, "OK", "text/xml; charset=\"utf-8\"", &body)
}

/// A UPnP error (a SOAP fault, HTTP 500).
pub fn fault(code: u16, description: &str) -> String {
    let body = format!(
        r#"<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>{code}</errorCode><errorDescription>{}</errorDescription></UPnPError></detail></s:Fault></s:Body></s:Envelope>"#,
        escape(description)
    );
    http_response(
        500,
        "Internal Server Error",
        "text/xml; charset=\"utf-8\"",
        &body,
    )
}

/// A whole HTTP response that closes the connection.
pub fn http_response(status: u16, reason: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nServer: Linux UPnP/1.1 reach-gateway/1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// UPnP error codes (UPnP IGD WANIPConnection:1 and the UDA).
pub mod code {
    /// No such action.
    pub const INVALID_ACTION: u16 = 401;
    /// Arguments missing or wrong.
    pub const INVALID_ARGS: u16 = 402;
    /// The action failed (the kernel refused, say).
    pub const ACTION_FAILED: u16 = 501;
    /// The policy refuses it.
    pub const NOT_AUTHORIZED: u16 = 606;
    /// GetGenericPortMappingEntry past the end.
    pub const ARRAY_INDEX_INVALID: u16 = 713;
    /// No mapping on that port.
    pub const NO_SUCH_ENTRY: u16 = 714;
    /// External port 0.
    pub const WILDCARD_EXTERNAL_PORT: u16 = 716;
    /// The port is another host's.
    pub const CONFLICT: u16 = 718;
    /// A remote host other than any.
    pub const REMOTE_HOST_WILDCARD_ONLY: u16 = 726;
    /// No port left, or over the quota.
    pub const NO_PORT_MAPS_AVAILABLE: u16 = 728;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn searches_are_answered_for_what_the_gateway_is() {
        let search = b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nMAN: \"ssdp:discover\"\r\nMX: 2\r\n\r\n";
        let st = search_target(search).unwrap();
        let answers = search_answers(&st, "http://10.0.0.1:5000/rootDesc.xml", "u1");
        assert_eq!(answers.len(), 1);
        assert!(answers[0].contains("LOCATION: http://10.0.0.1:5000/rootDesc.xml\r\n"));
        assert!(answers[0]
            .contains("USN: uuid:u1::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"));
        assert_eq!(search_answers("ssdp:all", "x", "u1").len(), 7);
        assert!(search_answers("urn:other", "x", "u1").is_empty());
        // Not a discovery: no MAN, or a NOTIFY.
        assert_eq!(
            search_target(b"M-SEARCH * HTTP/1.1\r\nST: ssdp:all\r\n\r\n"),
            None
        );
        assert_eq!(
            search_target(b"NOTIFY * HTTP/1.1\r\nST: ssdp:all\r\nMAN: \"ssdp:discover\"\r\n\r\n"),
            None
        );
    }

    #[test]
    fn requests_are_read_whole_and_within_bounds() {
        let body = r#"<?xml version="1.0"?><s:Envelope><s:Body><u:AddPortMapping xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1"><NewRemoteHost></NewRemoteHost><NewExternalPort>40022</NewExternalPort><NewProtocol>TCP</NewProtocol><NewPortMappingDescription>a &amp; b</NewPortMappingDescription><NewEmpty/></u:AddPortMapping></s:Body></s:Envelope>"#;
        let text = format!(
            "POST /ctl/IPConn HTTP/1.1\r\nHost: 10.0.0.1\r\nSOAPAction: \"{WANIP}#AddPortMapping\"\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let b = text.as_bytes();
        assert_eq!(parse_request(&b[..b.len() - 1]), Parse::Incomplete);
        let Parse::Done(r) = parse_request(b) else {
            panic!("not read")
        };
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, CONTROL_IP);
        assert_eq!(
            r.soap_action.as_deref(),
            Some(&*format!("{WANIP}#AddPortMapping"))
        );
        assert_eq!(arg(&r.body, "NewExternalPort").as_deref(), Some("40022"));
        assert_eq!(arg(&r.body, "NewRemoteHost").as_deref(), Some(""));
        assert_eq!(arg(&r.body, "NewEmpty").as_deref(), Some(""));
        assert_eq!(
            arg(&r.body, "NewPortMappingDescription").as_deref(),
            Some("a & b")
        );
        assert_eq!(arg(&r.body, "NewInternalClient"), None);
        let long = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(parse_request(long.as_bytes()), Parse::Bad("body too long"));
        assert_eq!(
            parse_request(&[b'a'; MAX_HEAD + 1]),
            Parse::Bad("request head too long")
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Parse::Bad("chunked bodies are not read")
        );
    }

    #[test]
    fn answers_and_faults_are_whole_http_responses() {
        let r = action_response(
            WANIP,
            "GetExternalIPAddress",
            &[("NewExternalIPAddress", "192.0.2.1".into())],
        );
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(body.contains("<NewExternalIPAddress>192.0.2.1</NewExternalIPAddress>"));
        let f = fault(code::CONFLICT, "ConflictInMappingEntry");
        assert!(f.starts_with("HTTP/1.1 500"));
        assert!(f.contains("<errorCode>718</errorCode>"));
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_fail_cleanly(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_request(&b);
            let _ = search_target(&b);
            if let Ok(s) = std::str::from_utf8(&b) {
                let _ = arg(s, "NewExternalPort");
            }
        }

        #[test]
        fn any_text_parses_or_fails_cleanly(s in "[<>/:a-zA-Z0-9 \r\n&;]{0,200}") {
            let _ = arg(&s, "NewExternalPort");
            let _ = parse_request(s.as_bytes());
            let _ = search_target(s.as_bytes());
        }
    }
}
