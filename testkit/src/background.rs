//! A command left running while a test goes on, typically a `berth
//! acquire` waiting in the queue: its output is collected as it comes (so
//! a test can wait for a progress line, and a chatty child never blocks on
//! a full pipe), and it is killed and reaped if the test drops it before it
//! ended, also when the test fails.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A child process running in the background. See the module docs.
pub struct Background {
    what: String,
    child: Option<Child>,
    stdout: Collected,
    stderr: Collected,
}

/// One output stream, filled by its own reader thread.
struct Collected {
    text: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
}

impl Collected {
    fn start(mut pipe: impl Read + Send + 'static) -> Self {
        let text = Arc::new(Mutex::new(Vec::new()));
        let sink = text.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self {
            text,
            reader: Some(reader),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().unwrap()).into_owned()
    }

    /// Everything the stream carried, once the child closed it.
    fn finish(&mut self) -> Vec<u8> {
        if let Some(r) = self.reader.take() {
            r.join().expect("output reader");
        }
        std::mem::take(&mut *self.text.lock().unwrap())
    }
}

impl Background {
    /// Starts `cmd` (`what` names it in failures) with no stdin and both
    /// output streams collected.
    pub fn spawn(what: &str, mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = Collected::start(child.stdout.take().unwrap());
        let stderr = Collected::start(child.stderr.take().unwrap());
        Self {
            what: what.to_owned(),
            child: Some(child),
            stdout,
            stderr,
        }
    }

    /// What the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Waits until the child's stderr contains `text`; panics after
    /// `timeout` with what it wrote.
    pub fn wait_for_stderr(&self, text: &str, timeout: Duration) {
        crate::wait_for(&format!("{} to print {text:?}", self.what), timeout, || {
            self.stderr().contains(text).then_some(())
        });
    }

    /// The child's output once it has exited; `None` while it runs, and
    /// after its output was taken.
    pub fn try_output(&mut self) -> Option<Output> {
        let status = self.child.as_mut()?.try_wait().expect("try_wait")?;
        Some(self.finish(status))
    }

    /// Whether the child's output was taken (by [`Background::try_output`]).
    pub fn taken(&self) -> bool {
        self.child.is_none()
    }

    /// Waits for the child to exit; its output.
    pub fn output(mut self) -> Output {
        let status = self
            .child
            .as_mut()
            .unwrap_or_else(|| panic!("{}'s output was taken already", self.what))
            .wait()
            .expect("wait");
        self.finish(status)
    }

    fn finish(&mut self, status: ExitStatus) -> Output {
        self.child = None;
        Output {
            status,
            stdout: self.stdout.finish(),
            stderr: self.stderr.finish(),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn a_finished_child_gives_its_whole_output_once() {
        // More than a pipe holds, so a child nobody read from would block.
        let mut b = Background::spawn(
            "a chatty child",
            sh("head -c 200000 /dev/zero; echo progress >&2; exit 3"),
        );
        let out = crate::wait_for("the child to exit", Duration::from_secs(10), || {
            b.try_output()
        });
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout.len(), 200_000);
        assert_eq!(out.stderr, b"progress\n");
        assert!(b.taken());
        assert!(b.try_output().is_none(), "the output is taken once");
    }

    #[test]
    fn a_child_is_watched_while_it_runs_and_killed_when_dropped() {
        let b = Background::spawn(
            "a waiting child",
            sh("echo 'position 1' >&2; exec sleep 60"),
        );
        b.wait_for_stderr("position 1", Duration::from_secs(10));
        let pid = b.child.as_ref().unwrap().id();
        drop(b);
        // Killed and reaped: its pid is gone.
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} is still there after the drop"
        );
    }
}
