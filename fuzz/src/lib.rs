//! Fuzz targets for everything berth parses that a client, a registry, an image or an
//! operator controls. Each takes arbitrary bytes and must return without panicking,
//! with work and memory bounded by its input; some also check a property (a canonical
//! reference parses to itself, channel framing round-trips, unpacking writes only
//! below its directory). `cargo +nightly fuzz run <target> --features libfuzzer` runs
//! one coverage-guided; `tests/replay.rs` runs all of them over the seed corpus and
//! its mutations on stable (CI).

use std::path::Path;

/// The target names, as `fuzz_targets/<name>.rs` and `corpus/<name>/`.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("image_reference", image_reference),
    ("event_filter", event_filter),
    ("image_documents", image_documents),
    ("tar_unpack", tar_unpack),
    ("spdy_frames", spdy_frames),
    ("ws_channels", ws_channels),
    ("cni_documents", cni_documents),
    ("config_file", config_file),
];

/// Image references: parsing never panics, and a canonical name parses to itself.
pub fn image_reference(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = berth_image::ImageRef::parse(s) {
        let canonical = r.canonical();
        let again = berth_image::ImageRef::parse(&canonical);
        assert!(
            again.as_ref().is_ok_and(|a| a.canonical() == canonical
                && a.registry() == r.registry()
                && a.repository() == r.repository()),
            "{s:?} -> {canonical:?} -> {again:?}"
        );
    }
}

/// containerd's filter language (as berthctl events and the API take it).
pub fn event_filter(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = berth_cri::events::filter::parse(s);
    let parts: Vec<&str> = s.split('\n').collect();
    let _ = berth_cri::events::filter::Filter::parse_all(&parts);
}

/// Manifests, indexes and image configs as a registry serves them.
pub fn image_documents(data: &[u8]) {
    if let Ok(berth_image::manifest::Document::Index(entries)) =
        berth_image::manifest::parse_document(data, "fuzz")
    {
        let _ = berth_image::manifest::pick_platform(&entries, "fuzz");
    }
    let _ = berth_image::manifest::parse_config(data, "fuzz");
}

/// A layer (any compression) unpacked into a temp dir: nothing is written outside it.
pub fn tar_unpack(data: &[u8]) {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let dest = dir.path().join("fs");
    if std::fs::create_dir(&dest).is_err() {
        return;
    }
    if let Ok(stream) = berth_image::unpack::decompress(data) {
        let marks = stream.marks();
        let _ = berth_image::unpack::unpack_layer(stream, &marks, &dest, "fuzz");
    }
    let beside: Vec<_> = std::fs::read_dir(dir.path())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        beside.len() == 1 && beside[0] == "fs",
        "unpacking wrote beside its dir: {beside:?}"
    );
}

/// SPDY/3 frames and their zlib header blocks, as a streaming client sends them.
pub fn spdy_frames(data: &[u8]) {
    let mut codec = berth_stream::spdy::HeaderCodec::new();
    let mut buf = bytes::BytesMut::from(data);
    for _ in 0..1024 {
        match berth_stream::spdy::Frame::decode(&mut buf, &mut codec) {
            Ok(Some(_)) => {}
            _ => break,
        }
    }
}

/// Kubernetes' WebSocket channel framing (binary and base64): decoding never panics,
/// and what is encoded decodes to itself.
pub fn ws_channels(data: &[u8]) {
    use tokio_tungstenite::tungstenite::Message;
    for protocol in ["v5.channel.k8s.io", "base64.channel.k8s.io"] {
        let framing = berth_stream::ws::Framing::of(protocol);
        let _ = framing.decode(&Message::Binary(data.to_vec().into()));
        if let Ok(s) = std::str::from_utf8(data) {
            let _ = framing.decode(&Message::Text(s.to_string().into()));
        }
        if let Some((&ch, payload)) = data.split_first() {
            let ch = if framing.base64 { ch % 80 } else { ch };
            let decoded = framing.decode(&framing.encode(ch, payload));
            assert_eq!(decoded, Some((ch, payload.to_vec())), "{protocol}");
        }
    }
}

/// CNI config lists, single configs and plugin results.
pub fn cni_documents(data: &[u8]) {
    let path = Path::new("fuzz.conflist");
    let _ = berth_network::conf::CniConfList::parse(data, true, path);
    let _ = berth_network::conf::CniConfList::parse(data, false, path);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = berth_network::result::pod_ips(&v);
    }
}

/// berthd's config file.
pub fn config_file(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = berth_cri::config::Config::parse(s, Path::new("fuzz.toml"));
}
