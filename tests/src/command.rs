//! Running a command to completion and capturing its output: the lowest layer of the harness,
//! used by the oracle fixtures and the process helpers alike.

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// Runs a command to completion and captures its output.
pub fn run(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// Runs a command to completion with `input` on its stdin and captures its output (the input is
/// written from another thread, so a command that writes before it reads cannot block on it).
pub fn run_with_input(command: &mut Command, input: &[u8]) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let data = input.to_vec();
    // A command that exits before reading everything closes the pipe: not the test's concern.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("cannot wait for {command:?}: {e}"));
    writer.join().expect("the stdin writer does not panic");
    out
}
