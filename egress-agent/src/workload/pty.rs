//! A terminal of the command's own. When `run` is started on a terminal, the command gets a
//! fresh pseudo-terminal as its controlling terminal (the descriptors among stdin, stdout and
//! stderr that were the terminal become the pty), and `run` relays between the two, as sudo's
//! `use_pty` does. The caller's terminal is then out of the command's reach: `TIOCSTI` and
//! friends act on the pty, whose input queue `run` owns, not on the shell that started `run`.
//!
//! While relaying, the caller's terminal is in raw mode (restored on every way out): keys such
//! as Ctrl-C reach the pty's line discipline, which signals the command's foreground process
//! group. Window size changes are copied over on SIGWINCH.

use std::{
    fs::File,
    io::{self, Read as _, Write as _},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::Mutex,
    thread,
};

use anyhow::Context as _;

/// An open pty pair, with the caller's terminal it stands in for.
pub struct Pty {
    master: OwnedFd,
    /// The slave, until the command has it.
    slave: Option<OwnedFd>,
    /// Which of 0, 1, 2 are the caller's terminal (they become the slave in the command).
    pub replaced: Vec<RawFd>,
    /// A descriptor of the caller's terminal (for its size and mode).
    terminal: RawFd,
    /// The caller's terminal mode before raw mode, restored on drop.
    saved: Mutex<Option<libc::termios>>,
}

impl Pty {
    /// A pty when any of stdin, stdout and stderr is a terminal; `None` otherwise.
    pub fn open_if_terminal() -> anyhow::Result<Option<Self>> {
        // SAFETY: isatty on the standard descriptors.
        let replaced: Vec<RawFd> = (0..3)
            .filter(|&fd| unsafe { libc::isatty(fd) } == 1)
            .collect();
        let Some(&terminal) = replaced.first() else {
            return Ok(None);
        };
        // SAFETY: zeroed termios/winsize are valid out-parameters.
        let mut mode: libc::termios = unsafe { std::mem::zeroed() };
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and out-parameters.
        let have_mode = unsafe { libc::tcgetattr(terminal, &mut mode) } == 0;
        // SAFETY: as above.
        let have_size = unsafe { libc::ioctl(terminal, libc::TIOCGWINSZ, &mut size) } == 0;
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: out-parameters for the two descriptors; mode and size are copied in.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                if have_mode { &mode } else { std::ptr::null() },
                if have_size { &size } else { std::ptr::null() },
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("cannot open a pty for the command");
        }
        // SAFETY: openpty returned two descriptors nobody else owns.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        // SAFETY: FD_CLOEXEC on our own master: the command must not inherit it.
        unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        Ok(Some(Self {
            master,
            slave: Some(slave),
            replaced,
            terminal,
            saved: Mutex::new(have_mode.then_some(mode)),
        }))
    }

    /// The slave's descriptor, for the child (it is not close-on-exec until the child's own
    /// descriptor sweep).
    pub fn slave_fd(&self) -> Option<RawFd> {
        self.slave.as_ref().map(|s| s.as_raw_fd())
    }

    /// Once the command runs: closes our copy of the slave (so the master sees the end when the
    /// command's copies are gone), puts the caller's terminal in raw mode and starts relaying.
    /// Returns the thread copying the command's output, to join after the command exits.
    ///
    /// Input is relayed, and the caller's terminal put in raw mode, only when `run` is in the
    /// terminal's foreground: a background job that reads its terminal is stopped by SIGTTIN
    /// (all of it, resolver included) and one that sets its mode by SIGTTOU. Started in the
    /// background, `run` leaves the terminal's mode and input alone and relays output only.
    pub fn relay(&mut self) -> anyhow::Result<thread::JoinHandle<()>> {
        self.slave = None;
        // SAFETY: tcgetpgrp and getpgrp take no pointers.
        let foreground = unsafe { libc::tcgetpgrp(self.terminal) == libc::getpgrp() };
        if !foreground {
            *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        if let Some(saved) = *self.saved.lock().unwrap_or_else(|p| p.into_inner()) {
            let mut raw = saved;
            // SAFETY: cfmakeraw edits the struct; tcsetattr on the caller's terminal.
            unsafe {
                libc::cfmakeraw(&mut raw);
                libc::tcsetattr(self.terminal, libc::TCSAFLUSH, &raw);
            }
        }
        let master_in = self
            .master
            .try_clone()
            .context("cannot duplicate the pty")?;
        if foreground && self.replaced.contains(&0) {
            thread::Builder::new()
                .name("pty-in".into())
                .spawn(move || {
                    // SAFETY: fd 0 stays open for the agent's life; ManuallyDrop keeps it.
                    let mut stdin = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(0) });
                    let mut master = File::from(master_in);
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stdin.read(&mut buf) {
                        if n == 0 || master.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                })
                .context("cannot start the pty input thread")?;
        }
        // Output goes to the caller's terminal: stdout if it is one, else the first that is.
        let out_fd = *self
            .replaced
            .iter()
            .find(|&&fd| fd != 0)
            .unwrap_or(&self.terminal);
        let master_out = self
            .master
            .try_clone()
            .context("cannot duplicate the pty")?;
        thread::Builder::new()
            .name("pty-out".into())
            .spawn(move || {
                let mut master = File::from(master_out);
                // SAFETY: the descriptor stays open for the agent's life; ManuallyDrop keeps it.
                let mut out = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(out_fd) });
                let mut buf = [0u8; 4096];
                // EIO once every copy of the slave is closed: the command and all it started
                // are gone.
                while let Ok(n) = master.read(&mut buf) {
                    if n == 0 || out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let _ = out.flush();
                }
            })
            .context("cannot start the pty output thread")
    }

    /// Copies the caller's window size to the pty (the kernel then signals SIGWINCH to the
    /// command's foreground process group).
    pub fn copy_window_size(terminal: RawFd, master: RawFd) {
        // SAFETY: zeroed winsize is a valid out-parameter; ioctls on descriptors we hold.
        unsafe {
            let mut size: libc::winsize = std::mem::zeroed();
            if libc::ioctl(terminal, libc::TIOCGWINSZ, &mut size) == 0 {
                libc::ioctl(master, libc::TIOCSWINSZ, &size);
            }
        }
    }

    /// (caller's terminal, master), for [`Pty::copy_window_size`].
    pub fn window_fds(&self) -> (RawFd, RawFd) {
        (self.terminal, self.master.as_raw_fd())
    }

    /// Puts the caller's terminal back as it was.
    pub fn restore(&self) {
        if let Some(saved) = self.saved.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // SAFETY: tcsetattr on the caller's terminal with the mode read from it.
            unsafe { libc::tcsetattr(self.terminal, libc::TCSAFLUSH, &saved) };
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        self.restore();
    }
}

/// In the command's process, between fork and exec: a new session whose controlling terminal
/// is the pty slave `slave`, which replaces each of `replaced`.
///
/// # Safety
/// Async-signal-safe: raw syscalls only.
pub unsafe fn take_terminal(slave: RawFd, replaced: &[RawFd]) -> io::Result<()> {
    // SAFETY: raw syscalls on descriptors the parent prepared.
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::ioctl(slave, libc::TIOCSCTTY, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
        for &fd in replaced {
            if libc::dup2(slave, fd) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}
