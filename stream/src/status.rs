//! The error-stream message of a remote command, as kubelet writes it: a
//! `metav1.Status` in JSON for v4+ (field order as Go marshals the struct), plain
//! text on failure only for v1-v3.

/// Remote-command protocol versions, newest first.
pub const REMOTE_COMMAND_PROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
/// The port-forward protocol.
pub const PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";

/// 1..=5 for a negotiated remote-command protocol (v5 over SPDY behaves as v4).
pub fn version_of(protocol: &str) -> u8 {
    match protocol {
        "v5.channel.k8s.io" => 5,
        "v4.channel.k8s.io" => 4,
        "v3.channel.k8s.io" => 3,
        "v2.channel.k8s.io" => 2,
        _ => 1,
    }
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Success: `{"metadata":{},"status":"Success"}`.
pub fn success_json() -> String {
    r#"{"metadata":{},"status":"Success"}"#.to_string()
}

/// A non-zero exit: reason `NonZeroExitCode` with an `ExitCode` cause.
pub fn exit_code_json(cmd: &[String], code: i32) -> String {
    let msg = format!(
        "command terminated with non-zero exit code: error executing command {}, exit code {code}",
        go_slice(cmd)
    );
    format!(
        r#"{{"metadata":{{}},"status":"Failure","message":{},"reason":"NonZeroExitCode","details":{{"causes":[{{"reason":"ExitCode","message":"{code}"}}]}}}}"#,
        quote(&msg)
    )
}

/// Any other failure: an `InternalError` (code 500).
pub fn internal_json(inner: &str) -> String {
    format!(
        r#"{{"metadata":{{}},"status":"Failure","message":{},"reason":"InternalError","details":{{"causes":[{{"message":{}}}]}},"code":500}}"#,
        quote(&format!("Internal error occurred: {inner}")),
        quote(inner)
    )
}

/// Go's `%v` of a `[]string`: `[sh -c exit 3]`.
fn go_slice(v: &[String]) -> String {
    format!("[{}]", v.join(" "))
}

/// The bytes for the error stream, or `None` when nothing is written (v1-v3 success).
pub fn error_stream_message(
    version: u8,
    cmd: &[String],
    outcome: &Result<i32, String>,
    what: &str,
) -> Option<Vec<u8>> {
    let json = version >= 4;
    match outcome {
        Ok(0) => json.then(|| success_json().into_bytes()),
        Ok(code) if json => Some(exit_code_json(cmd, *code).into_bytes()),
        Ok(code) => Some(
            format!(
                "command terminated with non-zero exit code: error executing command {}, exit code {code}",
                go_slice(cmd)
            )
            .into_bytes(),
        ),
        Err(e) => {
            let inner = format!("error {what}: {e}");
            Some(if json {
                internal_json(&inner).into_bytes()
            } else {
                inner.into_bytes()
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_kubelets_bytes() {
        let cmd = vec!["sh".to_string(), "-c".into(), "exit 3".into()];
        assert_eq!(
            error_stream_message(4, &cmd, &Ok(0), "executing command in container").unwrap(),
            br#"{"metadata":{},"status":"Success"}"#
        );
        assert_eq!(
            String::from_utf8(error_stream_message(4, &cmd, &Ok(3), "").unwrap()).unwrap(),
            r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#
        );
        assert_eq!(
            String::from_utf8(
                error_stream_message(4, &cmd, &Err("X".into()), "executing command in container")
                    .unwrap()
            )
            .unwrap(),
            r#"{"metadata":{},"status":"Failure","message":"Internal error occurred: error executing command in container: X","reason":"InternalError","details":{"causes":[{"message":"error executing command in container: X"}]},"code":500}"#
        );
        assert_eq!(error_stream_message(3, &cmd, &Ok(0), ""), None);
        assert!(error_stream_message(2, &cmd, &Ok(1), "").is_some());
        assert_eq!(version_of("v5.channel.k8s.io"), 5);
        assert_eq!(version_of("channel.k8s.io"), 1);
    }
}
