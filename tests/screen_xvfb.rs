//! Captures a real X screen: starts `Xvfb`, paints known colours on it with x11rb, and checks the
//! pixels [`ScreenSource`] returns, through MIT-SHM and through plain `GetImage`, on 24- and
//! 16-bit screens. Also checks the errors for a bad region, a missing display and a display with
//! no server.
//!
//! Without `Xvfb` installed the capture tests print a skip message and pass, unless `$CI` is set:
//! then they fail, because CI installs it.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sdcam::frame::{Frame, PixelFormat};
use sdcam::source::screen::{CaptureMethod, ScreenSource};
use sdcam::source::{Captured, ScreenOptions, Source};
use x11rb::connection::Connection;
use x11rb::protocol::xproto::{
    ChangeWindowAttributesAux, ConnectionExt as _, CreateWindowAux, WindowClass,
};
use x11rb::rust_connection::RustConnection;
use x11rb::wrapper::ConnectionExt as _;

/// Display numbers tried for test servers.
const DISPLAYS: std::ops::Range<u32> = 90..120;
/// Spreads the tests of this process over different display numbers.
static NEXT_DISPLAY: AtomicU32 = AtomicU32::new(0);

/// A running `Xvfb`, killed when dropped.
struct Xvfb {
    child: Child,
    display: String,
}

impl Xvfb {
    /// Starts `Xvfb` with a 320x240 screen of `depth` bits on a free display. `None` (after a
    /// skip message) if `Xvfb` is not installed and `$CI` is not set.
    fn start(depth: u8) -> Option<Xvfb> {
        let mut failures = Vec::new();
        for _ in 0..DISPLAYS.len() {
            let offset = NEXT_DISPLAY.fetch_add(1, Ordering::Relaxed) + std::process::id();
            let n = DISPLAYS.start + offset % DISPLAYS.len() as u32;
            if display_in_use(n) {
                continue;
            }
            let log = tempfile::NamedTempFile::new().expect("temporary file for the Xvfb log");
            let stderr = log.reopen().expect("reopen the Xvfb log");
            let spawned = Command::new("Xvfb")
                .arg(format!(":{n}"))
                .args(["-screen", "0", &format!("320x240x{depth}")])
                .args(["-nolisten", "tcp"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn();
            let child = match spawned {
                Ok(child) => child,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if std::env::var_os("CI").is_some() {
                        panic!("Xvfb is not installed, but $CI is set: install xvfb");
                    }
                    eprintln!("skipping X11 capture test: Xvfb is not installed");
                    return None;
                }
                Err(e) => panic!("cannot start Xvfb: {e}"),
            };
            let mut server = Xvfb {
                child,
                display: format!(":{n}"),
            };
            if server.wait_ready(n) {
                return Some(server);
            }
            failures.push(format!(
                ":{n}: {}",
                fs::read_to_string(log.path()).unwrap_or_default().trim()
            ));
        }
        panic!("could not start Xvfb on any display in {DISPLAYS:?}: {failures:#?}");
    }

    /// Waits up to 5 s until this server owns display `n` (socket present, lock file holding our
    /// pid). `false` if it exited (for example because another server took the display first).
    fn wait_ready(&mut self, n: u32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        let socket = format!("/tmp/.X11-unix/X{n}");
        let lock = format!("/tmp/.X{n}-lock");
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            let owns_lock = fs::read_to_string(&lock)
                .is_ok_and(|pid| pid.trim() == self.child.id().to_string());
            if owns_lock && Path::new(&socket).exists() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Xvfb {
    /// Stops the server with SIGTERM so it removes its socket and lock file; SIGKILL after 2 s.
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: signals our own child, which has not been reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether display `n` is held by a running X server: its lock file names a live process.
/// (Stale lock files and sockets left by killed servers are taken over by a new `Xvfb`.)
fn display_in_use(n: u32) -> bool {
    let Ok(content) = fs::read_to_string(format!("/tmp/.X{n}-lock")) else {
        // No lock: in use only if some server listens without one.
        return Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
            && std::os::unix::net::UnixStream::connect(format!("/tmp/.X11-unix/X{n}")).is_ok();
    };
    match content.trim().parse::<libc::pid_t>() {
        Ok(pid) if pid > 0 => {
            // SAFETY: signal 0 only checks whether the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0;
            alive || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
        }
        _ => true,
    }
}

/// The colours painted on the test screen, as (red, green, blue).
const RED: [u8; 3] = [255, 0, 0];
const GREEN: [u8; 3] = [0, 255, 0];
const BLUE: [u8; 3] = [0, 0, 255];

/// The colour [`paint`] leaves at screen position (x, y).
fn expected(x: u32, y: u32) -> [u8; 3] {
    if (120..140).contains(&x) && (80..90).contains(&y) {
        GREEN
    } else if x < 160 {
        RED
    } else {
        BLUE
    }
}

/// Paints the screen: blue root background, a red window over the left half, a small green window
/// at (120, 80) 20x10 on top. The windows live as long as the returned connection.
fn paint(display: &str) -> RustConnection {
    let (conn, screen_num) = RustConnection::connect(Some(display)).expect("connect to Xvfb");
    let screen = conn.setup().roots[screen_num].clone();
    let pixel = |[r, g, b]: [u8; 3]| {
        let c = |v: u8| u16::from(v) * 257;
        conn.alloc_color(screen.default_colormap, c(r), c(g), c(b))
            .expect("send AllocColor")
            .reply()
            .expect("allocate a colour")
            .pixel
    };
    let (red, green, blue) = (pixel(RED), pixel(GREEN), pixel(BLUE));

    conn.change_window_attributes(
        screen.root,
        &ChangeWindowAttributesAux::new().background_pixel(blue),
    )
    .expect("set the root background");
    conn.clear_area(false, screen.root, 0, 0, 0, 0)
        .expect("clear the root");
    for (x, y, w, h, colour) in [(0, 0, 160, 240, red), (120, 80, 20, 10, green)] {
        let win = conn.generate_id().expect("window id");
        conn.create_window(
            screen.root_depth,
            win,
            screen.root,
            x,
            y,
            w,
            h,
            0,
            WindowClass::INPUT_OUTPUT,
            screen.root_visual,
            &CreateWindowAux::new()
                .background_pixel(colour)
                .override_redirect(1),
        )
        .expect("create a window");
        conn.map_window(win).expect("map a window");
    }
    conn.sync().expect("paint the test screen");
    conn
}

fn options(display: &str, region: Option<(i32, i32, u32, u32)>, fps: f64) -> ScreenOptions {
    ScreenOptions {
        display: Some(display.to_string()),
        region,
        fps,
    }
}

fn next(source: &mut ScreenSource) -> Frame {
    match source.next_frame().expect("capture a frame") {
        Captured::Frame(frame) => frame,
        Captured::End => panic!("a screen source never ends"),
        Captured::Interrupted => panic!("nothing wakes this source"),
    }
}

/// Checks that `frame` is the BGRX image of the painted screen from (x0, y0).
fn check_pixels(frame: &Frame, x0: u32, y0: u32, what: &str) {
    assert_eq!(frame.format, PixelFormat::Bgrx32, "{what}");
    assert_eq!(
        frame.data.len(),
        frame.width as usize * frame.height as usize * 4,
        "{what}: frame must be tightly packed"
    );
    let mut wrong = Vec::new();
    for y in 0..frame.height {
        for x in 0..frame.width {
            let i = (y as usize * frame.width as usize + x as usize) * 4;
            let got = [frame.data[i + 2], frame.data[i + 1], frame.data[i]];
            let want = expected(x0 + x, y0 + y);
            if got != want {
                wrong.push(((x, y), got, want));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{what}: {} wrong pixels, first ((x, y), got, want): {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// A region with an odd width (scanline padding on 16-bit screens) that covers all three colours.
const REGION: (i32, i32, u32, u32) = (100, 50, 121, 100);

#[test]
fn captures_24_bit_screen_with_shm_and_get_image() {
    let Some(xvfb) = Xvfb::start(24) else { return };
    let _painter = paint(&xvfb.display);

    // MIT-SHM, paced at 20 fps.
    let mut shm = ScreenSource::open_with(
        &options(&xvfb.display, Some(REGION), 20.0),
        CaptureMethod::Shm,
    )
    .expect("open the screen with MIT-SHM");
    assert!(shm.uses_shm());
    assert!(shm.is_live());
    assert_eq!(shm.screen_size(), (320, 240));
    assert_eq!(shm.region(), REGION);
    assert_eq!(
        shm.describe(),
        format!(
            "screen {} region 100,50 121x100 (MIT-SHM) @ 20 fps",
            xvfb.display
        )
    );
    let start = Instant::now();
    let frames: Vec<Frame> = (0..3).map(|_| next(&mut shm)).collect();
    let elapsed = start.elapsed();
    for (i, frame) in frames.iter().enumerate() {
        assert_eq!((frame.width, frame.height), (121, 100));
        assert_eq!(frame.seq, i as u64);
        check_pixels(frame, 100, 50, "MIT-SHM");
    }
    assert!(
        elapsed >= Duration::from_millis(95),
        "3 frames at 20 fps took only {elapsed:?}"
    );
    assert!(frames[2].captured_at > frames[1].captured_at);
    drop(shm);

    // Plain GetImage.
    let mut plain = ScreenSource::open_with(
        &options(&xvfb.display, Some(REGION), 30.0),
        CaptureMethod::GetImage,
    )
    .expect("open the screen with GetImage");
    assert!(!plain.uses_shm());
    assert!(
        plain.describe().contains("(GetImage)"),
        "{}",
        plain.describe()
    );
    check_pixels(&next(&mut plain), 100, 50, "GetImage");

    // The whole screen, method chosen automatically: a local Xvfb offers MIT-SHM.
    let mut whole = ScreenSource::open(&options(&xvfb.display, None, 30.0)).expect("open");
    assert!(whole.uses_shm(), "{}", whole.describe());
    assert_eq!(whole.region(), (0, 0, 320, 240));
    let frame = next(&mut whole);
    assert_eq!((frame.width, frame.height), (320, 240));
    check_pixels(&frame, 0, 0, "whole screen");

    // A region that does not fit names the screen size.
    let err = ScreenSource::open(&options(&xvfb.display, Some((300, 0, 40, 10)), 30.0))
        .expect_err("region beyond the right edge");
    let msg = format!("{err:#}");
    assert!(msg.contains("320x240 screen"), "{msg}");
    assert!(msg.contains("300,0 40x10"), "{msg}");
}

#[test]
fn captures_16_bit_screen() {
    let Some(xvfb) = Xvfb::start(16) else { return };
    let _painter = paint(&xvfb.display);
    for method in [CaptureMethod::Shm, CaptureMethod::GetImage] {
        let mut source =
            ScreenSource::open_with(&options(&xvfb.display, Some(REGION), 30.0), method)
                .unwrap_or_else(|e| panic!("open a 16-bit screen with {method:?}: {e:#}"));
        let frame = next(&mut source);
        assert_eq!((frame.width, frame.height), (121, 100));
        check_pixels(&frame, 100, 50, &format!("16-bit {method:?}"));
    }
}

#[test]
fn missing_display_is_a_clear_error() {
    // No test in this file relies on $DISPLAY: each names its display explicitly.
    std::env::remove_var("DISPLAY");
    let err = ScreenSource::open(&ScreenOptions {
        display: None,
        region: None,
        fps: 30.0,
    })
    .expect_err("no display");
    let msg = format!("{err:#}");
    assert!(msg.contains("$DISPLAY is not set"), "{msg}");
    assert!(msg.contains("screen capture needs X11"), "{msg}");
}

#[test]
fn display_without_server_is_a_clear_error() {
    let n = (200..300)
        .find(|&n| !display_in_use(n))
        .expect("a free display number");
    let display = format!(":{n}");
    let err = ScreenSource::open(&options(&display, None, 30.0)).expect_err("no server");
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!(
            "cannot open X display '{display}' — is an X server running?"
        )),
        "{msg}"
    );
    assert!(msg.contains("under Wayland, use XWayland"), "{msg}");
}

#[test]
fn bad_frame_rate_is_rejected() {
    let err = ScreenSource::open(&options(":0", None, 0.0)).expect_err("zero fps");
    assert!(format!("{err:#}").contains("out of range"), "{err:#}");
}
