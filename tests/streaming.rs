//! Exec, attach and port-forward through berth's streaming server, driven
//! as kubelet and crictl drive them: the CRI RPC answers a URL, the test's
//! own SPDY and WebSocket clients (tests/common/cri_stream.rs) open it.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::cri_pod::{CriNode, Rt, remove_pod, run_container, run_pod, status, wait_exited};
use common::cri_stream::{
    CommandInput, CommandResult, SpdyClient, WsClient, spdy_command, websocket_command,
};
use k8s_cri::v1::*;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use berth::stream::spdy::{self, Frame};
use berth::stream::websocket::{ChannelCodec, Message};

/// How long a container may take to exit.
const WAIT: Duration = Duration::from_secs(15);

/// A pod, in the host's network namespace when `host_network`.
fn pod_config(node: &CriNode, name: &str, host_network: bool) -> PodSandboxConfig {
    PodSandboxConfig {
        linux: host_network.then(|| LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..node.pod_config(name)
    }
}

/// How a test container's stdio is set up.
#[derive(Default, Clone, Copy)]
struct Stdio {
    stdin: bool,
    stdin_once: bool,
    tty: bool,
}

/// Starts a busybox container logging to `<name>/0.log`.
async fn start_container(
    node: &CriNode,
    rt: &mut Rt,
    pod: &str,
    pod_config: &PodSandboxConfig,
    name: &str,
    command: &[&str],
    stdio: Stdio,
) -> String {
    let config = ContainerConfig {
        log_path: format!("{name}/0.log"),
        stdin: stdio.stdin,
        stdin_once: stdio.stdin_once,
        tty: stdio.tty,
        ..node.busybox_config(name, command)
    };
    run_container(rt, pod, pod_config, &config).await
}

fn exec_request(id: &str, cmd: &[&str], input: &CommandInput) -> ExecRequest {
    ExecRequest {
        container_id: id.to_string(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty: input.tty,
        stdin: input.stdin.is_some(),
        stdout: input.stdout,
        stderr: input.stderr,
    }
}

async fn exec_url(rt: &mut Rt, id: &str, cmd: &[&str], input: &CommandInput) -> String {
    let url = rt
        .exec(exec_request(id, cmd, input))
        .await
        .expect("Exec")
        .into_inner()
        .url;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    url
}

async fn spdy_exec(rt: &mut Rt, id: &str, cmd: &[&str], input: CommandInput) -> CommandResult {
    let url = exec_url(rt, id, cmd, &input).await;
    spdy_command(&url, &input).await
}

fn output() -> CommandInput {
    CommandInput {
        stdout: true,
        stderr: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_over_spdy_streams_output_input_terminal_and_exit_codes() {
    let node = CriNode::start().await;
    let mut rt = node.berthd.runtime().await;
    let pc = pod_config(&node, "exec", false);
    let pod = run_pod(&mut rt, &pc).await;
    let id = start_container(
        &node,
        &mut rt,
        &pod,
        &pc,
        "sleeper",
        &["sleep", "100000"],
        Stdio::default(),
    )
    .await;

    let result = spdy_exec(
        &mut rt,
        &id,
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        output(),
    )
    .await;
    assert_eq!(result.stdout(), "out\n");
    assert_eq!(result.stderr(), "err\n");
    assert_eq!(result.exit_code(), 3, "the exit code reaches the client");

    // The command gets SIGPIPE as a shell would: `yes` ends with `head`.
    let result = spdy_exec(&mut rt, &id, &["sh", "-c", "yes | head -c 6"], output()).await;
    assert_eq!(result.stdout(), "y\ny\ny\n");
    assert_eq!(result.exit_code(), 0);

    let result = spdy_exec(&mut rt, &id, &["echo", "hello"], output()).await;
    assert_eq!(
        (result.stdout().as_str(), result.exit_code()),
        ("hello\n", 0)
    );

    let input = CommandInput {
        stdin: Some(b"line one\nline two\n".to_vec()),
        close_stdin: true,
        ..output()
    };
    let result = spdy_exec(&mut rt, &id, &["cat"], input).await;
    assert_eq!(
        result.stdout(),
        "line one\nline two\n",
        "stdin reaches the command and ends"
    );
    assert_eq!(result.exit_code(), 0);

    // `-it`: a terminal from the container's devpts, with its size.
    let input = CommandInput {
        stdin: Some(b"hello\r".to_vec()),
        stdout: true,
        tty: true,
        size: Some((101, 33)),
        ..Default::default()
    };
    let result = spdy_exec(
        &mut rt,
        &id,
        &[
            "sh",
            "-c",
            "read line; tty; stty size; echo got:$line; exit 5",
        ],
        input,
    )
    .await;
    let text = result.stdout();
    assert!(
        text.contains("/dev/pts/0"),
        "a pty of the container's own devpts: {text:?}"
    );
    assert!(text.contains("33 101"), "the size arrived: {text:?}");
    assert!(text.contains("got:hello"), "{text:?}");
    assert!(result.stderr.is_empty(), "a terminal has one output");
    assert_eq!(result.exit_code(), 5);

    let result = spdy_exec(&mut rt, &id, &["no-such-command"], output()).await;
    let status = result.status();
    assert_eq!(status["status"], "Failure", "{status}");
    assert_eq!(status["reason"], "InternalError", "{status}");
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("executable file not found")),
        "{status}"
    );

    // A token is good once.
    let url = exec_url(&mut rt, &id, &["true"], &output()).await;
    assert_eq!(spdy_command(&url, &output()).await.exit_code(), 0);
    let again = SpdyClient::connect(&url, &["v4.channel.k8s.io"])
        .await
        .err()
        .expect("a used token is refused");
    assert_eq!(again.status, 404);
    // A client that speaks no protocol of ours is told which we speak.
    let url = exec_url(&mut rt, &id, &["true"], &output()).await;
    let refused = SpdyClient::connect(&url, &["v9.channel.k8s.io"])
        .await
        .err()
        .expect("unknown protocol refused");
    assert_eq!(refused.status, 403);

    // The exec round trip of `true`, from the Exec RPC to its exit status.
    let mut times = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        let url = exec_url(&mut rt, &id, &["true"], &output()).await;
        assert_eq!(spdy_command(&url, &output()).await.exit_code(), 0);
        times.push(start.elapsed());
    }
    times.sort();
    eprintln!(
        "streaming exec round trip of `true` (Exec RPC, SPDY, exit status): p50 {:?}, max {:?}",
        times[times.len() / 2],
        times[times.len() - 1]
    );

    // Requests the streaming server cannot serve are refused by the RPC.
    let code =
        |r: Result<tonic::Response<ExecResponse>, tonic::Status>| r.expect_err("refused").code();
    let mut both = exec_request(&id, &["true"], &output());
    both.tty = true;
    assert_eq!(code(rt.exec(both).await), tonic::Code::InvalidArgument);
    let nothing = exec_request(&id, &["true"], &CommandInput::default());
    assert_eq!(code(rt.exec(nothing).await), tonic::Code::InvalidArgument);
    let no_cmd = exec_request(&id, &[], &output());
    assert_eq!(code(rt.exec(no_cmd).await), tonic::Code::InvalidArgument);
    let unknown = exec_request("0123456789abcdef", &["true"], &output());
    assert_eq!(code(rt.exec(unknown).await), tonic::Code::NotFound);
    rt.stop_container(StopContainerRequest {
        container_id: id.clone(),
        timeout: 0,
    })
    .await
    .expect("StopContainer");
    let stopped = exec_request(&id, &["true"], &output());
    assert_eq!(
        code(rt.exec(stopped).await),
        tonic::Code::FailedPrecondition
    );
    let err = rt
        .attach(AttachRequest {
            container_id: id.clone(),
            stdout: true,
            ..Default::default()
        })
        .await
        .expect_err("attach to a stopped container");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    remove_pod(&mut rt, &pod).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_over_websocket_speaks_v5() {
    let node = CriNode::start().await;
    let mut rt = node.berthd.runtime().await;
    let pc = pod_config(&node, "wsexec", false);
    let pod = run_pod(&mut rt, &pc).await;
    let id = start_container(
        &node,
        &mut rt,
        &pod,
        &pc,
        "sleeper",
        &["sleep", "100000"],
        Stdio::default(),
    )
    .await;

    let input = output();
    let url = exec_url(
        &mut rt,
        &id,
        &["sh", "-c", "echo out; echo err >&2; exit 4"],
        &input,
    )
    .await;
    let result = websocket_command(&url, &input).await;
    assert_eq!(result.stdout(), "out\n");
    assert_eq!(result.stderr(), "err\n");
    assert_eq!(result.exit_code(), 4);

    // v5's close signal ends the command's stdin.
    let input = CommandInput {
        stdin: Some(b"through websocket\n".to_vec()),
        close_stdin: true,
        ..output()
    };
    let url = exec_url(&mut rt, &id, &["cat"], &input).await;
    let result = websocket_command(&url, &input).await;
    assert_eq!(result.stdout(), "through websocket\n");
    assert_eq!(result.exit_code(), 0);

    let input = CommandInput {
        stdin: Some(b"x\r".to_vec()),
        stdout: true,
        tty: true,
        size: Some((120, 40)),
        ..Default::default()
    };
    let url = exec_url(&mut rt, &id, &["sh", "-c", "read x; stty size"], &input).await;
    let result = websocket_command(&url, &input).await;
    assert!(result.stdout().contains("40 120"), "{:?}", result.stdout());

    remove_pod(&mut rt, &pod).await;
}

/// One attach session, driven frame by frame.
struct Attach {
    client: SpdyClient,
    stdin: Option<u32>,
    stdout: u32,
    stderr: Option<u32>,
    error: u32,
    out: Vec<u8>,
    err: Vec<u8>,
    status: Vec<u8>,
    ended: bool,
}

impl Attach {
    async fn open(rt: &mut Rt, id: &str, stdin: bool, tty: bool) -> Attach {
        let url = rt
            .attach(AttachRequest {
                container_id: id.to_string(),
                stdin,
                tty,
                stdout: true,
                stderr: !tty,
            })
            .await
            .expect("Attach")
            .into_inner()
            .url;
        let mut client = SpdyClient::connect(&url, &["v4.channel.k8s.io"])
            .await
            .expect("SPDY upgrade");
        let error = client.open(&[("streamType", "error")]).await;
        let stdin = match stdin {
            true => Some(client.open(&[("streamType", "stdin")]).await),
            false => None,
        };
        let stdout = client.open(&[("streamType", "stdout")]).await;
        let stderr = match tty {
            false => Some(client.open(&[("streamType", "stderr")]).await),
            true => None,
        };
        if tty {
            let resize = client.open(&[("streamType", "resize")]).await;
            client
                .data(resize, b"{\"Width\":90,\"Height\":20}\n", false)
                .await;
        }
        Attach {
            client,
            stdin,
            stdout,
            stderr,
            error,
            out: Vec::new(),
            err: Vec::new(),
            status: Vec::new(),
            ended: false,
        }
    }

    async fn send(&mut self, data: &[u8], fin: bool) {
        let id = self.stdin.expect("attached with stdin");
        self.client.data(id, data, fin).await;
    }

    /// Reads until stdout holds `needle` (or, with None, until the end).
    async fn read_until(&mut self, needle: Option<&str>) {
        match needle {
            Some(n) => self.read_while(|a| !text(&a.out).contains(n)).await,
            None => self.read_while(|a| !a.ended).await,
        }
    }

    /// Reads as long as `more` holds.
    async fn read_while(&mut self, more: impl Fn(&Attach) -> bool) {
        while more(self) {
            match self.client.next().await {
                Some(Frame::Data {
                    stream_id,
                    flags,
                    data,
                }) => {
                    if stream_id == self.stdout {
                        self.out.extend_from_slice(&data);
                    } else if Some(stream_id) == self.stderr {
                        self.err.extend_from_slice(&data);
                    } else if stream_id == self.error {
                        self.status.extend_from_slice(&data);
                        if flags & spdy::FLAG_FIN != 0 {
                            self.ended = true;
                        }
                    }
                }
                Some(_) => {}
                None => {
                    assert!(
                        !more(self),
                        "attach ended early; stdout {:?}",
                        text(&self.out)
                    );
                    return;
                }
            }
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_shares_the_containers_stdio_and_detaches_cleanly() {
    let node = CriNode::start().await;
    let mut rt = node.berthd.runtime().await;
    let pc = pod_config(&node, "attach", false);
    let pod = run_pod(&mut rt, &pc).await;
    let echo = start_container(
        &node,
        &mut rt,
        &pod,
        &pc,
        "echo",
        &[
            "sh",
            "-c",
            "while read l; do echo out:$l; echo err:$l >&2; done; echo end",
        ],
        Stdio {
            stdin: true,
            ..Default::default()
        },
    )
    .await;

    // A watcher without stdin, and a client that types.
    let mut watcher = Attach::open(&mut rt, &echo, false, false).await;
    let mut typist = Attach::open(&mut rt, &echo, true, false).await;
    typist.send(b"one\n", false).await;
    typist.read_until(Some("out:one")).await;
    watcher.read_until(Some("out:one")).await;
    typist
        .read_while(|a| !text(&a.err).contains("err:one"))
        .await;
    // Its stdin ends: without stdin_once that detaches it, and only it.
    typist.send(b"", true).await;
    typist.read_until(None).await;
    assert!(typist.ended);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&typist.status).expect("status")["status"],
        "Success"
    );
    assert_eq!(
        status(&mut rt, &echo).await.state,
        ContainerState::ContainerRunning as i32
    );
    let mut second = Attach::open(&mut rt, &echo, true, false).await;
    second.send(b"two\n", true).await;
    second.read_until(None).await;
    watcher.read_until(Some("out:two")).await;
    assert_eq!(
        status(&mut rt, &echo).await.state,
        ContainerState::ContainerRunning as i32
    );
    // The container's exit ends the watcher's attach.
    rt.stop_container(StopContainerRequest {
        container_id: echo.clone(),
        timeout: 0,
    })
    .await
    .expect("StopContainer");
    watcher.read_until(None).await;
    assert!(watcher.ended);

    // stdin_once: the first attach's end of input closes the container's
    // stdin (what `kubectl run -i --rm` relies on).
    let once = start_container(
        &node,
        &mut rt,
        &pod,
        &pc,
        "once",
        &["sh", "-c", "cat; echo cat-done"],
        Stdio {
            stdin: true,
            stdin_once: true,
            ..Default::default()
        },
    )
    .await;
    let url = rt
        .attach(AttachRequest {
            container_id: once.clone(),
            stdin: true,
            stdout: true,
            stderr: true,
            tty: false,
        })
        .await
        .expect("Attach")
        .into_inner()
        .url;
    let input = CommandInput {
        stdin: Some(b"only once\n".to_vec()),
        close_stdin: true,
        ..output()
    };
    let result = spdy_command(&url, &input).await;
    assert_eq!(result.stdout(), "only once\ncat-done\n");
    assert_eq!(result.exit_code(), 0, "attach reports success");
    assert_eq!(wait_exited(&mut rt, &once, WAIT).await.exit_code, 0);

    // A terminal: input echoed, the size applied, detach leaves it running.
    let shell = start_container(
        &node,
        &mut rt,
        &pod,
        &pc,
        "shell",
        &["sh"],
        Stdio {
            stdin: true,
            tty: true,
            ..Default::default()
        },
    )
    .await;
    let mut term = Attach::open(&mut rt, &shell, true, true).await;
    term.send(b"stty size\r", false).await;
    term.read_until(Some("20 90")).await;
    term.send(b"", true).await;
    term.read_until(None).await;
    assert!(term.ended);
    assert_eq!(
        status(&mut rt, &shell).await.state,
        ContainerState::ContainerRunning as i32
    );

    remove_pod(&mut rt, &pod).await;
}

/// One forwarded connection over a port-forward session: sends `request`,
/// returns what came back on the data and error streams.
async fn forward_once(
    client: &mut SpdyClient,
    port: u16,
    request_ids: &[u32],
    request: &[u8],
) -> HashMap<u32, (Vec<u8>, Vec<u8>)> {
    let mut streams = HashMap::new();
    for rid in request_ids {
        let rid_text = rid.to_string();
        let port_text = port.to_string();
        let error = client
            .open(&[
                ("streamType", "error"),
                ("port", &port_text),
                ("requestID", &rid_text),
            ])
            .await;
        client.data(error, b"", true).await;
        let data = client
            .open(&[
                ("streamType", "data"),
                ("port", &port_text),
                ("requestID", &rid_text),
            ])
            .await;
        client.data(data, request, false).await;
        streams.insert(*rid, (error, data));
    }
    let mut got: HashMap<u32, (Vec<u8>, Vec<u8>)> = HashMap::new();
    let mut open: Vec<u32> = streams.values().flat_map(|(e, d)| [*e, *d]).collect();
    while !open.is_empty() {
        match client.next().await {
            Some(Frame::Data {
                stream_id,
                flags,
                data,
            }) => {
                let (rid, is_error) = streams
                    .iter()
                    .find_map(|(rid, (e, d))| {
                        (stream_id == *e || stream_id == *d).then_some((*rid, stream_id == *e))
                    })
                    .expect("a stream of ours");
                let entry = got.entry(rid).or_default();
                if is_error {
                    entry.1.extend_from_slice(&data);
                } else {
                    entry.0.extend_from_slice(&data);
                }
                if flags & spdy::FLAG_FIN != 0 {
                    open.retain(|&id| id != stream_id);
                }
            }
            Some(Frame::SynReply { .. }) => {}
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("connection closed with streams open"),
        }
    }
    got
}

/// A port-forward over the WebSocket channel protocol, as the Python and
/// JavaScript clients speak it: `request` on every port's data channel, then
/// what came back on each port's data and error channels until the server
/// closed the session.
async fn forward_on_channels(
    url: &str,
    protocol: &str,
    codec: ChannelCodec,
    ports: usize,
    request: &[u8],
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut ws = WsClient::connect(url, &[protocol])
        .await
        .expect("WebSocket upgrade");
    assert_eq!(ws.protocol, protocol);
    for port in 0..ports {
        ws.send(codec.frame(2 * port as u8, request)).await;
    }
    let mut got = vec![(Vec::new(), Vec::new()); ports];
    loop {
        match ws.next().await {
            Some(Message::Binary(message) | Message::Text(message)) => {
                let (channel, data) = codec.unframe(&message).expect("a channel's message");
                let (data_channel, error_channel) = &mut got[usize::from(channel / 2)];
                if channel % 2 == 0 {
                    data_channel.extend_from_slice(&data);
                } else {
                    error_channel.extend_from_slice(&data);
                }
            }
            Some(Message::Close(_)) | None => return got,
            Some(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_reaches_the_pods_ports_and_the_hosts() {
    let node = CriNode::start().await;
    let mut rt = node.berthd.runtime().await;
    let pc = pod_config(&node, "web", false);
    let pod = run_pod(&mut rt, &pc).await;
    let httpd = start_container(
        &node,
        &mut rt,
        &pod,
        &pc,
        "httpd",
        &[
            "sh",
            "-c",
            "mkdir /www && echo hello-from-the-pod > /www/index.html && \
             head -c 1000000 /dev/urandom > /www/big && exec httpd -f -p 8080 -h /www",
        ],
        Stdio::default(),
    )
    .await;
    let url = |rt: &mut Rt, pod: String| {
        let mut rt = rt.clone();
        async move {
            rt.port_forward(PortForwardRequest {
                pod_sandbox_id: pod,
                port: vec![8080],
            })
            .await
            .expect("PortForward")
            .into_inner()
            .url
        }
    };

    let mut client = SpdyClient::connect(&url(&mut rt, pod.clone()).await, &["portforward.k8s.io"])
        .await
        .expect("SPDY upgrade");
    assert_eq!(client.protocol, "portforward.k8s.io");
    // The server may not be listening yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut rid = 0;
    loop {
        rid += 1;
        let got = forward_once(
            &mut client,
            8080,
            &[rid],
            b"GET /index.html HTTP/1.0\r\n\r\n",
        )
        .await;
        let (data, error) = &got[&rid];
        if error.is_empty() {
            let text = String::from_utf8_lossy(data);
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            assert!(text.ends_with("hello-from-the-pod\n"), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}; httpd's log: {:?}",
            String::from_utf8_lossy(error),
            std::fs::read_to_string(node.logs.path().join("web/httpd/0.log"))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Many connections at once, a megabyte each.
    let ids: Vec<u32> = (100..108).collect();
    let got = forward_once(&mut client, 8080, &ids, b"GET /big HTTP/1.0\r\n\r\n").await;
    let sum_url = rt
        .exec(ExecRequest {
            container_id: httpd.clone(),
            cmd: vec!["sha256sum".into(), "/www/big".into()],
            stdout: true,
            ..Default::default()
        })
        .await
        .expect("Exec")
        .into_inner()
        .url;
    let sum = spdy_command(
        &sum_url,
        &CommandInput {
            stdout: true,
            ..Default::default()
        },
    )
    .await
    .stdout();
    for rid in &ids {
        let (data, error) = &got[rid];
        assert!(error.is_empty(), "{}", text(error));
        let start = data
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("headers")
            + 4;
        assert_eq!(data.len() - start, 1_000_000, "connection {rid}");
        let digest = hex::encode(sha2::Sha256::digest(&data[start..]));
        assert!(
            sum.starts_with(&digest),
            "body of connection {rid} arrived whole"
        );
    }
    // A port nobody listens on: the error stream says so.
    let got = forward_once(&mut client, 9, &[500], b"x").await;
    let error = String::from_utf8_lossy(&got[&500].1).into_owned();
    assert!(error.contains("error forwarding port 9"), "{error}");

    // The same through WebSocket: SPDY tunneled in binary messages.
    let mut tunnel = SpdyClient::tunnel(&url(&mut rt, pod.clone()).await)
        .await
        .expect("WebSocket upgrade");
    let got = forward_once(
        &mut tunnel,
        8080,
        &[1, 2, 3],
        b"GET /index.html HTTP/1.0\r\n\r\n",
    )
    .await;
    for rid in [1, 2, 3] {
        let (data, error) = &got[&rid];
        assert!(error.is_empty(), "{}", text(error));
        assert!(
            text(data).ends_with("hello-from-the-pod\n"),
            "{}",
            text(data)
        );
    }
    drop(tunnel);

    // The WebSocket channel protocol: ports from the query, each announced
    // (u16, little endian) on its data and error channels; a port nobody
    // listens on fails on its error channel alone.
    let got = forward_on_channels(
        &(url(&mut rt, pod.clone()).await + "?port=8080&port=9"),
        "v4.channel.k8s.io",
        ChannelCodec::Binary,
        2,
        b"GET /index.html HTTP/1.0\r\n\r\n",
    )
    .await;
    let (data, error) = &got[0];
    assert_eq!(data[..2], 8080u16.to_le_bytes());
    assert_eq!(error[..], 8080u16.to_le_bytes(), "{}", text(error));
    assert!(
        text(&data[2..]).starts_with("HTTP/1.1 200"),
        "{}",
        text(data)
    );
    assert!(
        text(data).ends_with("hello-from-the-pod\n"),
        "{}",
        text(data)
    );
    let (data, error) = &got[1];
    assert_eq!(data[..], 9u16.to_le_bytes());
    assert_eq!(error[..2], 9u16.to_le_bytes());
    assert!(
        text(&error[2..]).contains("error forwarding port 9"),
        "{}",
        text(error)
    );
    // Base64 text; no query: the ports of the PortForwardRequest.
    let got = forward_on_channels(
        &url(&mut rt, pod.clone()).await,
        "v4.base64.channel.k8s.io",
        ChannelCodec::Base64,
        1,
        b"GET /index.html HTTP/1.0\r\n\r\n",
    )
    .await;
    let (data, error) = &got[0];
    assert_eq!(error[..], 8080u16.to_le_bytes(), "{}", text(error));
    assert!(
        text(data).ends_with("hello-from-the-pod\n"),
        "{}",
        text(data)
    );
    // A port that is not one: refused before the upgrade.
    for bad in ["port=http", "port=0", "port=70000", "port="] {
        let refused = WsClient::connect(
            &format!("{}?{bad}", url(&mut rt, pod.clone()).await),
            &["v4.channel.k8s.io"],
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("{bad} accepted"));
        assert_eq!(refused.status, 400, "{bad}: {}", refused.body);
    }

    // A pod on the host's network: the port is the host's.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let host_port = listener.local_addr().expect("addr").port();
    let echo = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1024];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let hpc = pod_config(&node, "hostnet", true);
    let host_pod = run_pod(&mut rt, &hpc).await;
    let mut client = SpdyClient::connect(
        &url(&mut rt, host_pod.clone()).await,
        &["portforward.k8s.io"],
    )
    .await
    .expect("SPDY upgrade");
    let rid = 7;
    let port_text = host_port.to_string();
    let error = client
        .open(&[
            ("streamType", "error"),
            ("port", &port_text),
            ("requestID", "7"),
        ])
        .await;
    client.data(error, b"", true).await;
    let data = client
        .open(&[
            ("streamType", "data"),
            ("port", &port_text),
            ("requestID", "7"),
        ])
        .await;
    client.data(data, b"ping over the host", true).await;
    let mut echoed = Vec::new();
    let mut open = vec![error, data];
    while !open.is_empty() {
        match client.next().await {
            Some(Frame::Data {
                stream_id,
                flags,
                data: bytes,
            }) => {
                if stream_id == data {
                    echoed.extend_from_slice(&bytes);
                } else {
                    assert!(
                        bytes.is_empty(),
                        "error: {}",
                        String::from_utf8_lossy(&bytes)
                    );
                }
                if flags & spdy::FLAG_FIN != 0 {
                    open.retain(|&id| id != stream_id);
                }
            }
            Some(_) => {}
            None => panic!("closed early"),
        }
    }
    assert_eq!(echoed, b"ping over the host", "request {rid}");
    echo.abort();

    drop(client);
    remove_pod(&mut rt, &host_pod).await;
    remove_pod(&mut rt, &pod).await;
}
