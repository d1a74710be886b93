//! Keeps docs/PROTOCOL.md honest: its hex dump of a login frame must be the
//! bytes the real encoder produces, and it must name every `Code` that
//! proto/tether/v1/client.proto defines.

use tether::wire::pb::{self, client_frame::Body};
use tether::wire::{frame_bytes, Code};

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md");
const CLIENT_PROTO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/tether/v1/client.proto");

/// The login frame shown in the "Example: a login frame" section.
fn example_login() -> pb::ClientFrame {
    pb::ClientFrame {
        request_id: 1,
        body: Some(Body::Login(pb::Login {
            token: "eyJ...example".into(),
            device_id: "phone-1".into(),
            platform: pb::Platform::Ios as i32,
            protocol_version: 1,
            resume: None,
        })),
    }
}

/// Formats bytes like `hexdump -C`: an offset column, 16 bytes per line in two
/// groups of 8, then the printable ASCII between bars.
fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, line) in bytes.chunks(16).enumerate() {
        let mut hex = String::new();
        for (j, b) in line.iter().enumerate() {
            if j == 8 {
                hex.push(' ');
            }
            hex.push_str(&format!("{b:02x} "));
        }
        let ascii: String = line
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!("{:08x}  {hex:<49} |{ascii}|\n", i * 16));
    }
    out.push_str(&format!("{:08x}\n", bytes.len()));
    out
}

/// The `CODE_*` names declared in the `Code` enum of client.proto.
fn proto_code_names(proto: &str) -> Vec<String> {
    let start = proto
        .find("enum Code {")
        .expect("client.proto declares enum Code");
    let body = &proto[start..];
    let end = body.find('}').expect("enum Code is closed");
    body[..end]
        .lines()
        .map(|l| l.split("//").next().unwrap_or("").trim())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with("CODE_"))
        .map(str::to_owned)
        .collect()
}

/// Whether `text` contains `name` as a whole identifier, so that
/// `CODE_UNSUPPORTED` is not found inside `CODE_UNSUPPORTED_VERSION`.
fn mentions(text: &str, name: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(name).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + name.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

#[test]
fn protocol_doc_matches_the_code() {
    let doc = std::fs::read_to_string(DOC).expect("docs/PROTOCOL.md is readable");

    // 1. The hex dump of the example login frame is the real encoding.
    let frame = frame_bytes(&example_login());
    let dump = hex_dump(&frame);
    assert!(
        doc.contains(&dump),
        "docs/PROTOCOL.md must contain this exact hex dump of the example login:\n{dump}"
    );

    // 2. Every Code in client.proto is documented (and is a real variant).
    let proto = std::fs::read_to_string(CLIENT_PROTO).expect("client.proto is readable");
    let names = proto_code_names(&proto);
    assert!(
        names.len() >= 20,
        "parsed too few codes from client.proto: {names:?}"
    );
    for name in &names {
        assert!(
            Code::from_str_name(name).is_some(),
            "{name} is in client.proto but not in the generated Code"
        );
    }
    let missing: Vec<&String> = names.iter().filter(|n| !mentions(&doc, n)).collect();
    assert!(
        missing.is_empty(),
        "docs/PROTOCOL.md does not mention these codes: {missing:?}"
    );
}
