//! X11 screen capture: grabs the root window (or a region of it) at a fixed rate.
//!
//! Frames are read with the MIT-SHM extension when the X server offers it and the connection is a
//! local (Unix-domain) one: the server writes the image straight into a shared-memory segment, so
//! no pixels travel through the socket. Otherwise, or if setting SHM up fails, sdcam falls back to
//! the core `GetImage` request. Either way the image arrives in the server's ZPixmap layout and is
//! turned into tightly packed [`PixelFormat::Bgrx32`] frames: 24/32-bit little-endian screens are
//! copied row by row (scanline padding stripped), 15/16-bit and big-endian TrueColor screens are
//! converted pixel by pixel (the X byte is then 0xff; on the copy path it is whatever the server
//! stored, usually 0). Other visuals (8-bit palette screens, 24-bit packed pixels) are
//! refused with an error naming the depth.
//!
//! This file holds the source itself (connection, capture region, grab, pacing); the ZPixmap
//! layout and its conversion are in [`zpixmap`], the shared-memory segment in [`shm_segment`].

mod shm_segment;
mod zpixmap;

use std::os::fd::AsRawFd;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use x11rb::connection::{Connection, RequestConnection};
use x11rb::cookie::{Cookie, VoidCookie};
use x11rb::errors::{ConnectionError, ReplyError};
use x11rb::protocol::shm::{self, ConnectionExt as _};
use x11rb::protocol::xproto::{self, ConnectionExt as _, ImageFormat};
use x11rb::rust_connection::RustConnection;
use x11rb::x11_utils::TryParse;

use super::pacer::Pacer;
use super::{Captured, ScreenOptions, Source, Wake};
use crate::frame::{ColorRange, Frame, PixelFormat};
use crate::stage::{StageInfo, StageResult};
use crate::Result;
use shm_segment::ShmSegment;
use zpixmap::ImageLayout;

/// Hint appended to every "cannot reach the X server" error.
const X11_HINT: &str = "screen capture needs X11 (under Wayland, use XWayland or a camera source)";

/// Highest frame rate a screen source accepts.
const MAX_FPS: f64 = 1000.0;

/// How [`ScreenSource`] reads pixels from the X server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaptureMethod {
    /// MIT-SHM when the server supports it and the connection is local, else `GetImage`.
    #[default]
    Auto,
    /// MIT-SHM only: opening fails if it cannot be set up (used by tests and benchmarks).
    Shm,
    /// The core `GetImage` request only: every frame travels through the X socket.
    GetImage,
}

/// A live source that captures an X11 screen (see the module documentation).
pub struct ScreenSource {
    conn: RustConnection,
    root: xproto::Window,
    display: String,
    screen_size: (u32, u32),
    region: Region,
    layout: ImageLayout,
    shm: Option<ShmSegment>,
    /// `Auto` falls back to `GetImage` if an SHM grab fails later; `Shm` reports the error.
    method: CaptureMethod,
    fps: f64,
    pacer: Pacer,
    seq: u64,
}

impl std::fmt::Debug for ScreenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScreenSource")
            .field("display", &self.display)
            .field("screen_size", &self.screen_size)
            .field("region", &self.region)
            .field("layout", &self.layout)
            .field("shm", &self.shm.is_some())
            .field("fps", &self.fps)
            .field("seq", &self.seq)
            .finish()
    }
}

impl ScreenSource {
    /// Connects to `opts.display` (or `$DISPLAY`) and prepares to capture the root window or
    /// `opts.region`, using MIT-SHM where possible.
    pub fn open(opts: &ScreenOptions) -> Result<ScreenSource> {
        Self::open_with(opts, CaptureMethod::Auto)
    }

    /// Like [`ScreenSource::open`], with an explicit choice of capture method.
    pub fn open_with(opts: &ScreenOptions, method: CaptureMethod) -> Result<ScreenSource> {
        if !opts.fps.is_finite() || opts.fps <= 0.0 || opts.fps > MAX_FPS {
            bail!(
                "screen capture rate {} fps is out of range (0 < fps <= {MAX_FPS})",
                opts.fps
            );
        }
        let display = resolve_display(
            opts.display.as_deref(),
            std::env::var("DISPLAY").ok().as_deref(),
        )?;
        let (conn, screen_num) = RustConnection::connect(Some(&display)).map_err(|e| {
            anyhow::Error::new(e).context(format!(
                "cannot open X display '{display}' — is an X server running? {X11_HINT}"
            ))
        })?;

        let setup = conn.setup();
        let screen = setup
            .roots
            .get(screen_num)
            .ok_or_else(|| anyhow!("X display '{display}' has no screen {screen_num}"))?;
        let root = screen.root;
        let layout = ImageLayout::for_screen(setup, screen)
            .with_context(|| format!("cannot capture X display '{display}'"))?;

        // The setup block holds the size at connection time; ask for the current one.
        let geometry = reply(conn.get_geometry(root))
            .with_context(|| format!("cannot query the root window size of '{display}'"))?;
        let screen_size = (u32::from(geometry.width), u32::from(geometry.height));
        let region = Region::validate(opts.region, screen_size)
            .with_context(|| format!("cannot capture X display '{display}'"))?;

        let mut source = ScreenSource {
            conn,
            root,
            display,
            screen_size,
            region,
            layout,
            shm: None,
            method,
            fps: opts.fps,
            pacer: Pacer::new(opts.fps),
            seq: 0,
        };
        match method {
            CaptureMethod::GetImage => {}
            CaptureMethod::Shm => {
                source.shm = Some(source.setup_shm().with_context(|| {
                    format!("cannot use MIT-SHM on X display '{}'", source.display)
                })?);
            }
            CaptureMethod::Auto => match source.setup_shm() {
                Ok(seg) => source.shm = Some(seg),
                Err(e) => tracing::info!(
                    "screen capture on '{}' falls back to GetImage: MIT-SHM unavailable ({e:#})",
                    source.display
                ),
            },
        }
        tracing::info!("{}", source.describe());
        Ok(source)
    }

    /// Whether frames are currently read through MIT-SHM (otherwise through `GetImage`).
    pub fn uses_shm(&self) -> bool {
        self.shm.is_some()
    }

    /// Size of the whole screen (root window) when the source was opened.
    pub fn screen_size(&self) -> (u32, u32) {
        self.screen_size
    }

    /// The captured region as (x, y, width, height); the whole screen if none was given.
    pub fn region(&self) -> (i32, i32, u32, u32) {
        let r = self.region;
        (i32::from(r.x), i32::from(r.y), r.width, r.height)
    }

    /// Creates a shared-memory segment big enough for one region image and attaches it to the
    /// X server.
    fn setup_shm(&self) -> Result<ShmSegment> {
        if self
            .conn
            .extension_information(shm::X11_EXTENSION_NAME)
            .context("cannot query X extensions")?
            .is_none()
        {
            bail!("the X server does not offer the MIT-SHM extension");
        }
        if !is_unix_socket(self.conn.stream().as_raw_fd()) {
            bail!("the X connection is not local (MIT-SHM needs a Unix-domain socket)");
        }
        reply(self.conn.shm_query_version()).context("MIT-SHM version query failed")?;
        let size = self.layout.stride(self.region.width) * self.region.height as usize;
        let mut segment = ShmSegment::create(size)?;
        let seg = self.conn.generate_id().context("cannot allocate an X id")?;
        check(self.conn.shm_attach(seg, segment.id as u32, false))
            .context("the X server refused to attach the shared-memory segment")?;
        segment.seg = Some(seg);
        // Both sides are attached: mark the segment for removal now, so the kernel frees it when
        // the last of them detaches, even if sdcam or the server dies.
        segment.remove();
        Ok(segment)
    }

    /// Reads the region's pixels once, in the server's ZPixmap layout, and converts them.
    fn grab(&mut self) -> Result<Vec<u8>> {
        let Region {
            x,
            y,
            width,
            height,
        } = self.region;
        let (w16, h16) = (width as u16, height as u16);
        if let Some(segment) = &self.shm {
            let result = reply(self.conn.shm_get_image(
                self.root,
                x,
                y,
                w16,
                h16,
                !0,
                ImageFormat::Z_PIXMAP.into(),
                segment.seg.unwrap_or_default(),
                0,
            ));
            match result {
                Ok(_) => {
                    return self
                        .layout
                        .convert_to_bgrx(segment.as_slice(), width, height)
                }
                Err(e) if self.method == CaptureMethod::Auto => {
                    tracing::warn!(
                        "MIT-SHM capture on '{}' failed ({e}); falling back to GetImage",
                        self.display
                    );
                    self.drop_shm();
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "MIT-SHM capture of region {} on '{}' failed (did the screen shrink?)",
                        self.region, self.display
                    )))
                }
            }
        }
        let image =
            reply(
                self.conn
                    .get_image(ImageFormat::Z_PIXMAP, self.root, x, y, w16, h16, !0),
            )
            .with_context(|| {
                format!(
                    "GetImage of region {} on '{}' failed (did the screen shrink?)",
                    self.region, self.display
                )
            })?;
        self.layout.convert_to_bgrx(&image.data, width, height)
    }

    /// Detaches the shared-memory segment from the server and unmaps it.
    fn drop_shm(&mut self) {
        if let Some(segment) = self.shm.take() {
            if let Some(seg) = segment.seg {
                let _ = self.conn.shm_detach(seg);
                let _ = self.conn.flush();
            }
            drop(segment);
        }
    }
}

impl Drop for ScreenSource {
    fn drop(&mut self) {
        self.drop_shm();
    }
}

impl Source for ScreenSource {
    fn next_frame(&mut self) -> StageResult<Captured> {
        if !self.pacer.wait() {
            return Ok(Captured::Interrupted);
        }
        let captured_at = Instant::now();
        let data = self.grab()?;
        let seq = self.seq;
        self.seq += 1;
        Ok(Captured::Frame(Frame {
            width: self.region.width,
            height: self.region.height,
            format: PixelFormat::Bgrx32,
            range: ColorRange::Full,
            data,
            seq,
            captured_at,
        }))
    }

    fn describe(&self) -> String {
        format!(
            "screen {} region {} ({}) @ {} fps",
            self.display,
            self.region,
            if self.shm.is_some() {
                "MIT-SHM"
            } else {
                "GetImage"
            },
            self.fps
        )
    }

    fn fps(&self) -> f64 {
        self.fps
    }

    fn info(&self) -> StageInfo {
        StageInfo {
            live: true,
            exclusive_device: false,
            reconnect_on_loss: true,
            buffers_frames: false,
        }
    }

    fn set_wake(&mut self, wake: Wake) {
        self.pacer.set_wake(wake);
    }
}

/// Waits for the reply to a request that may have failed to send.
fn reply<C, R>(cookie: Result<Cookie<'_, C, R>, ConnectionError>) -> Result<R, ReplyError>
where
    C: RequestConnection + ?Sized,
    R: TryParse,
{
    cookie?.reply()
}

/// Waits until the server has processed a request without reply; reports its X error, if any.
fn check<C>(cookie: Result<VoidCookie<'_, C>, ConnectionError>) -> Result<(), ReplyError>
where
    C: RequestConnection + ?Sized,
{
    cookie?.check()
}

/// The display to connect to: the explicit name, else `$DISPLAY`.
fn resolve_display(explicit: Option<&str>, env: Option<&str>) -> Result<String> {
    match explicit.or(env).map(str::trim) {
        Some(name) if !name.is_empty() => Ok(name.to_string()),
        _ => bail!("no X display given and $DISPLAY is not set — {X11_HINT}"),
    }
}

/// Whether `fd` is a Unix-domain socket (so the X server runs on this machine).
fn is_unix_socket(fd: std::os::fd::RawFd) -> bool {
    // SAFETY: `addr` is a properly sized, zeroed sockaddr_storage and `len` holds its size;
    // getsockname writes at most `len` bytes into it.
    unsafe {
        let mut addr: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        libc::getsockname(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        ) == 0
            && i32::from(addr.ss_family) == libc::AF_UNIX
    }
}

/// A capture rectangle already checked against the screen, in X protocol units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    x: i16,
    y: i16,
    width: u32,
    height: u32,
}

impl Region {
    /// Checks that `region` (or the whole screen if `None`) is non-empty and lies within a
    /// screen of `screen` (width, height) pixels.
    fn validate(region: Option<(i32, i32, u32, u32)>, screen: (u32, u32)) -> Result<Region> {
        let (sw, sh) = screen;
        if sw == 0 || sh == 0 || sw > u32::from(u16::MAX) || sh > u32::from(u16::MAX) {
            bail!("the X screen reports an invalid size {sw}x{sh}");
        }
        let (x, y, w, h) = region.unwrap_or((0, 0, sw, sh));
        if w == 0 || h == 0 {
            bail!("capture region {x},{y} {w}x{h} is empty");
        }
        let fits = x >= 0
            && y >= 0
            && i64::from(x) + i64::from(w) <= i64::from(sw)
            && i64::from(y) + i64::from(h) <= i64::from(sh);
        if !fits {
            bail!("capture region {x},{y} {w}x{h} does not lie within the {sw}x{sh} screen");
        }
        // X coordinates are 16-bit signed; only screens wider than 32767 pixels could fail here.
        Ok(Region {
            x: i16::try_from(x).context("region x out of range")?,
            y: i16::try_from(y).context("region y out of range")?,
            width: w,
            height: h,
        })
    }
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{} {}x{}", self.x, self.y, self.width, self.height)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_screen_is_default_region() {
        let r = Region::validate(None, (320, 240)).unwrap();
        assert_eq!((r.x, r.y, r.width, r.height), (0, 0, 320, 240));
    }

    #[test]
    fn region_inside_screen_is_accepted() {
        let r = Region::validate(Some((10, 20, 310, 220)), (320, 240)).unwrap();
        assert_eq!((r.x, r.y, r.width, r.height), (10, 20, 310, 220));
        assert_eq!(r.to_string(), "10,20 310x220");
    }

    #[test]
    fn region_outside_screen_is_rejected() {
        for region in [
            (10, 20, 311, 220),
            (10, 20, 310, 221),
            (-1, 0, 10, 10),
            (0, -5, 10, 10),
            (i32::MAX, 0, u32::MAX, 1),
        ] {
            let err = Region::validate(Some(region), (320, 240)).unwrap_err();
            assert!(
                err.to_string().contains("320x240 screen"),
                "{region:?}: {err}"
            );
        }
        let err = Region::validate(Some((0, 0, 0, 10)), (320, 240)).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }

    #[test]
    fn display_resolution() {
        assert_eq!(resolve_display(Some(":3"), Some(":0")).unwrap(), ":3");
        assert_eq!(resolve_display(None, Some(":0")).unwrap(), ":0");
        let err = resolve_display(None, None).unwrap_err();
        assert!(err.to_string().contains("$DISPLAY is not set"), "{err}");
        assert!(resolve_display(Some(" "), None).is_err());
    }
}
