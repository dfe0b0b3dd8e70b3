//! The real binaries: `fsm-sidecar` serving `--probes` without a control plane, and
//! `fsm-healthcheck` answering rewritten tcpSocket probes. Every port is picked free at run time.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const SIDECAR: &str = env!("CARGO_BIN_EXE_fsm-sidecar");
const HEALTHCHECK: &str = env!("CARGO_BIN_EXE_fsm-healthcheck");
const NODE_ID: &str = "00000000-0000-0000-0000-000000000001.sidecar.sa.ns";

/// A child process killed when the test ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn listener() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    (listener, port)
}

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    listener().1
}

/// Serves each connection of `listener` on its own thread.
fn serve_each(listener: TcpListener, handle: fn(TcpStream)) {
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || handle(stream));
        }
    });
}

/// Reads an HTTP/1.1 request head.
fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read_exact(&mut byte).is_err() {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn header(head: &str, name: &str) -> String {
    head.lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// The application: `/healthz` answers 200 with the request line and `x-probe` header it got,
/// `/fail` answers 500.
fn app(mut stream: TcpStream) {
    let head = read_head(&mut stream);
    let line = head.lines().next().unwrap_or_default().to_string();
    let path = line.split(' ').nth(1).unwrap_or_default();
    let (status, body) = match path {
        "/healthz" => (200, format!("{line} x-probe={}", header(&head, "x-probe"))),
        "/fail" => (500, "failing".to_string()),
        _ => (404, "app: no such page".to_string()),
    };
    let answer = format!(
        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes());
}

fn echo(mut stream: TcpStream) {
    let mut back = stream.try_clone().expect("clone");
    let _ = std::io::copy(&mut stream, &mut back);
}

/// Accepts and never answers.
fn silent(stream: TcpStream) {
    thread::sleep(Duration::from_secs(10));
    drop(stream);
}

/// One HTTP/1.1 request to 127.0.0.1:`port`: the status and the body.
fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: 10.244.0.23:{port}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    let status = answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Waits until 127.0.0.1:`port` accepts, failing if the process exits first.
fn wait_for(child: &mut Running, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("exited ({status}) before listening on {port}");
        }
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// fsm-sidecar without a control plane (ADS at a closed port), with `--probes` when given.
fn sidecar(probes: Option<&str>) -> Command {
    let mut command = Command::new(SIDECAR);
    command.args([
        "--node-id",
        NODE_ID,
        "--ads-insecure",
        "--ads",
        &format!("127.0.0.1:{}", free_port()),
        "--admin",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
    ]);
    if let Some(probes) = probes {
        command.args(["--probes", probes]);
    }
    command
}

/// Runs `command` until it exits (10 s at most): its status and standard error.
fn run_to_exit(mut command: Command) -> (ExitStatus, String) {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after 10 s");
        }
        thread::sleep(Duration::from_millis(50));
    };
    (status, reader.join().expect("stderr reader"))
}

#[test]
fn sidecar_serves_probes_without_a_control_plane() {
    let (app_listener, app_port) = listener();
    serve_each(app_listener, app);
    let (echo_listener, echo_port) = listener();
    serve_each(echo_listener, echo);
    let (silent_listener, silent_port) = listener();
    serve_each(silent_listener, silent);
    let down_port = free_port();
    let [liveness, readiness, startup, https] = [(); 4].map(|()| free_port());
    let probes = format!(
        r#"[
          {{"listenPort": {liveness}, "path": "/fsm-liveness-probe", "scheme": "HTTP",
            "targetPort": {app_port}, "targetPath": "/healthz", "timeoutSeconds": 1}},
          {{"listenPort": {readiness}, "path": "/fsm-readiness-probe", "scheme": "HTTP",
            "targetPort": {app_port}, "targetPath": "/fail", "timeoutSeconds": 1}},
          {{"listenPort": {startup}, "path": "/fsm-startup-probe", "scheme": "HTTP",
            "targetPort": {down_port}, "targetPath": "/healthz", "timeoutSeconds": 1}},
          {{"listenPort": {startup}, "path": "/slow", "scheme": "HTTP",
            "targetPort": {silent_port}, "targetPath": "/healthz", "timeoutSeconds": 1}},
          {{"listenPort": {https}, "scheme": "HTTPS", "targetPort": {echo_port},
            "timeoutSeconds": 1}}
        ]"#
    );
    let mut command = sidecar(Some(&probes));
    let mut child = Running(
        command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fsm-sidecar"),
    );
    for port in [liveness, readiness, startup, https] {
        wait_for(&mut child, port);
    }

    // The app's status and body come back; the path is rewritten, the kubelet's headers pass.
    assert_eq!(
        get(liveness, "/fsm-liveness-probe", &[("x-probe", "kubelet")]),
        (200, "GET /healthz HTTP/1.1 x-probe=kubelet".to_string())
    );
    assert_eq!(
        get(readiness, "/fsm-readiness-probe", &[]),
        (500, "failing".to_string())
    );
    // Another path on a probe port, even another probe's, is not a probe.
    assert_eq!(get(liveness, "/fsm-readiness-probe", &[]).0, 404);
    assert_eq!(get(liveness, "/healthz", &[]).0, 404);
    // App down, or not answering in time: 503.
    let (status, body) = get(startup, "/fsm-startup-probe", &[]);
    assert_eq!(status, 503, "{body}");
    let started = Instant::now();
    let (status, body) = get(startup, "/slow", &[]);
    assert_eq!(status, 503, "{body}");
    assert!(started.elapsed() < Duration::from_secs(5), "{body}");

    // HTTPS: the bytes (the kubelet's TLS) reach the app's port as they are, both ways.
    let mut stream = TcpStream::connect(("127.0.0.1", https)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let hello = b"\x16\x03\x01\x00\x05hello";
    stream.write_all(hello).expect("write");
    let mut back = [0u8; 10];
    stream.read_exact(&mut back).expect("echo");
    assert_eq!(&back, hello);
}

#[test]
fn sidecar_refuses_bad_probes_naming_the_field() {
    let [a, b] = [(); 2].map(|()| free_port());
    let (status, stderr) = run_to_exit(sidecar(Some(&format!(
        r#"[{{"listenPort": {a}, "path": "/fsm-liveness-probe", "targetPort": 14001}},
            {{"listenPort": {b}, "path": "/fsm-readiness-probe", "targetPort": 0}}]"#
    ))));
    assert!(!status.success());
    assert!(
        stderr.contains("--probes[1].targetPort: 0 is not a port"),
        "{stderr}"
    );

    let (status, stderr) = run_to_exit(sidecar(Some(&format!(
        r#"[{{"listenPort": {a}, "path": "/p", "targetPort": 14001}},
            {{"listenPort": {a}, "path": "/p", "targetPort": 14002}}]"#
    ))));
    assert!(!status.success());
    assert!(stderr.contains("--probes[1].path"), "{stderr}");

    // From the environment too.
    let mut command = sidecar(None);
    command.env("FSM_SIDECAR_PROBES", "{not json");
    let (status, stderr) = run_to_exit(command);
    assert!(!status.success());
    assert!(stderr.contains("--probes: not valid JSON"), "{stderr}");

    // A probe port already taken.
    let (_taken, taken) = listener();
    let (status, stderr) = run_to_exit(sidecar(Some(&format!(
        r#"[{{"listenPort": {taken}, "path": "/p", "targetPort": 14001}}]"#
    ))));
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("binding probe port {taken}")),
        "{stderr}"
    );
}

#[test]
fn healthcheck_answers_by_original_tcp_port() {
    let (open_listener, open_port) = listener();
    serve_each(open_listener, |_| {});
    let closed_port = free_port();
    let port = free_port();
    let mut child = Running(
        Command::new(HEALTHCHECK)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fsm-healthcheck"),
    );
    wait_for(&mut child, port);

    let open = open_port.to_string();
    let closed = closed_port.to_string();
    let (status, body) = get(port, "/fsm-healthcheck", &[("Original-Tcp-Port", &open)]);
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(port, "/fsm-healthcheck", &[("original-tcp-port", &closed)]);
    assert_eq!(status, 503, "{body}");
    let (status, body) = get(port, "/fsm-healthcheck", &[]);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("Original-Tcp-Port"), "{body}");
    let (status, body) = get(port, "/fsm-healthcheck", &[("Original-Tcp-Port", "x")]);
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        get(port, "/fsm-liveness-probe", &[("Original-Tcp-Port", &open)]).0,
        404
    );
}
