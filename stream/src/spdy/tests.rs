//! Frames against hand-written bytes from the spec, and a client/server session.

use bytes::BytesMut;

use super::frame::{FLAG_FIN, Frame, RST_CANCEL};
use super::*;

fn encode(f: &Frame) -> Vec<u8> {
    let mut b = BytesMut::new();
    f.encode(&mut HeaderCodec::new(), &mut b).unwrap();
    b.to_vec()
}

#[test]
fn control_frames_match_the_wire_format() {
    assert_eq!(
        encode(&Frame::Ping(1)),
        [0x80, 0x03, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 0, 0, 0, 1]
    );
    assert_eq!(
        encode(&Frame::RstStream {
            id: 3,
            status: RST_CANCEL
        }),
        [
            0x80, 0x03, 0x00, 0x03, 0x00, 0x00, 0x00, 0x08, 0, 0, 0, 3, 0, 0, 0, 5
        ]
    );
    assert_eq!(
        encode(&Frame::GoAway {
            last_good: 7,
            status: 0
        }),
        [
            0x80, 0x03, 0x00, 0x07, 0x00, 0x00, 0x00, 0x08, 0, 0, 0, 7, 0, 0, 0, 0
        ]
    );
    // Close(): an empty DATA frame with FIN.
    assert_eq!(
        encode(&Frame::Data {
            id: 5,
            flags: FLAG_FIN,
            data: bytes::Bytes::new()
        }),
        [0, 0, 0, 5, 0x01, 0, 0, 0]
    );
    // The first SYN_REPLY of a session: header, stream id, then zlib with FDICT.
    let r = encode(&Frame::SynReply {
        id: 1,
        flags: 0,
        headers: Headers::default(),
    });
    assert_eq!(&r[..4], &[0x80, 0x03, 0x00, 0x02]);
    assert_eq!(r[4], 0);
    let len = u32::from_be_bytes([0, r[5], r[6], r[7]]) as usize;
    assert_eq!(len, r.len() - 8);
    assert_eq!(&r[8..12], &[0, 0, 0, 1]);
    assert_eq!(&r[12..18], &[0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2]);
}

#[test]
fn decode_handles_partial_input_and_ignores_flow_control() {
    let mut codec = HeaderCodec::new();
    // WINDOW_UPDATE on the session (stream 0) then SETTINGS with one entry, then DATA.
    let mut wire = vec![0x80, 0x03, 0x00, 0x09, 0, 0, 0, 8, 0, 0, 0, 0, 0, 1, 0, 0];
    wire.extend([
        0x80, 0x03, 0x00, 0x04, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 7, 0, 1, 0, 0,
    ]);
    wire.extend([0, 0, 0, 1, 0, 0, 0, 3, b'a', b'b', b'c']);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for b in wire {
        buf.extend_from_slice(&[b]);
        while let Some(f) = Frame::decode(&mut buf, &mut codec).unwrap() {
            got.push(f);
        }
    }
    assert_eq!(got.len(), 3);
    assert_eq!(got[0], Frame::Ignored(9));
    assert_eq!(got[1], Frame::Ignored(4));
    assert_eq!(
        got[2],
        Frame::Data {
            id: 1,
            flags: 0,
            data: bytes::Bytes::from_static(b"abc")
        }
    );
    // Unknown control types and DATA on stream 0 end the session.
    let mut bad = BytesMut::from(&[0x80, 0x03, 0x00, 0x0a, 0, 0, 0, 0][..]);
    assert!(Frame::decode(&mut bad, &mut codec).is_err());
    let mut bad = BytesMut::from(&[0, 0, 0, 0, 0, 0, 0, 0][..]);
    assert!(Frame::decode(&mut bad, &mut codec).is_err());
}

#[test]
fn syn_stream_round_trips_with_priority_and_headers() {
    let (mut a, mut b) = (HeaderCodec::new(), HeaderCodec::new());
    let f = Frame::SynStream {
        id: 3,
        associated: 0,
        priority: 2,
        flags: 0,
        headers: Headers::default().with("streamType", "stdout"),
    };
    let mut buf = BytesMut::new();
    f.encode(&mut a, &mut buf).unwrap();
    assert_eq!(buf[16], 2 << 5, "priority in the top 3 bits");
    assert_eq!(Frame::decode(&mut buf, &mut b).unwrap(), Some(f));
    assert!(buf.is_empty());
}

#[tokio::test]
async fn session_streams_data_fin_ping_and_goaway() {
    let (c, s) = tokio::io::duplex(1 << 16);
    let (server, mut incoming) = Connection::server(
        s,
        std::time::Duration::from_secs(60),
        crate::limits::StreamLimits::default(),
    );
    let client = Connection::client(c);
    let srv = tokio::spawn(async move {
        let inc = incoming.recv().await.unwrap();
        assert_eq!(inc.headers.get("streamType"), Some("stdin"));
        let mut st = inc.accept().await.unwrap();
        let mut got = Vec::new();
        while let Some(b) = st.read().await {
            got.extend_from_slice(&b);
        }
        let w = st.writer();
        w.write(&got.repeat(2)).await.unwrap();
        w.close().await.unwrap();
        // A second stream is refused.
        let inc = incoming.recv().await.unwrap();
        inc.reject().await;
        server.closed().await;
    });
    let st = client
        .open(Headers::default().with("streamType", "stdin"))
        .await
        .unwrap();
    let (mut rx, w) = st.split();
    w.write(b"hello ").await.unwrap();
    w.write(&vec![b'x'; 100_000]).await.unwrap();
    w.close().await.unwrap();
    let mut back = Vec::new();
    while let Some(b) = rx.recv().await {
        back.extend_from_slice(&b);
    }
    assert_eq!(back.len(), 2 * 100_006);
    assert!(back.starts_with(b"hello xx"));
    client.ping(1).await.unwrap();
    let refused = client
        .open(Headers::default().with("streamType", "x"))
        .await;
    assert!(refused.is_err(), "a rejected stream fails to open");
    client.close().await;
    tokio::time::timeout(std::time::Duration::from_secs(5), srv)
        .await
        .unwrap()
        .unwrap();
}

/// A session whose streams are not read holds at most its budget, whatever the
/// client sends; once read, everything arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_buffers_at_most_its_budget() {
    use crate::limits::{CHUNK, StreamLimits};
    let limits = StreamLimits {
        session_buffer_bytes: 2 * CHUNK,
        stream_buffer_bytes: CHUNK,
        ..Default::default()
    };
    let (c, s) = tokio::io::duplex(1 << 16);
    let (server, mut incoming) = Connection::server(s, std::time::Duration::from_secs(60), limits);
    let client = Connection::client(c);
    let accepting = tokio::spawn(async move {
        let mut streams = Vec::new();
        for _ in 0..3 {
            streams.push(incoming.recv().await.unwrap().accept().await.unwrap());
        }
        streams
    });
    // All streams open before any data flows (as client-go opens them).
    let mut opened = Vec::new();
    for i in 0..3 {
        opened.push(
            client
                .open(Headers::default().with("n", &i.to_string()))
                .await
                .unwrap(),
        );
    }
    let mut writers = Vec::new();
    for st in opened {
        writers.push(tokio::spawn(async move {
            let w = st.writer();
            w.write(&vec![b'a'; 1 << 20]).await.unwrap();
            w.close().await.unwrap();
        }));
    }
    let streams = accepting.await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        server.buffered_bytes() <= 2 * CHUNK,
        "{} bytes buffered",
        server.buffered_bytes()
    );
    assert!(
        writers.iter().any(|w| !w.is_finished()),
        "the client was not slowed down"
    );
    let mut totals = Vec::new();
    for st in streams {
        let (mut rx, _) = st.split();
        totals.push(tokio::spawn(async move {
            let mut n = 0;
            while let Some(b) = rx.recv().await {
                assert!(b.len() <= CHUNK);
                n += b.len();
            }
            n
        }));
    }
    for t in totals {
        assert_eq!(t.await.unwrap(), 1 << 20);
    }
    assert_eq!(server.buffered_bytes(), 0);
}
