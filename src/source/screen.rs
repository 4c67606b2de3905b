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

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use x11rb::connection::{Connection, RequestConnection};
use x11rb::cookie::{Cookie, VoidCookie};
use x11rb::errors::{ConnectionError, ReplyError};
use x11rb::protocol::shm::{self, ConnectionExt as _};
use x11rb::protocol::xproto::{self, ConnectionExt as _, ImageFormat, ImageOrder, VisualClass};
use x11rb::rust_connection::RustConnection;
use x11rb::x11_utils::TryParse;

use super::{Captured, ScreenOptions, Source, Wake};
use crate::frame::{ColorRange, Frame, PixelFormat};
use crate::stage::{StageInfo, StageResult};
use crate::Result;

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
    period: Duration,
    next_due: Option<Instant>,
    wake: Wake,
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
            period: Duration::from_secs_f64(1.0 / opts.fps),
            next_due: None,
            wake: Wake::new(),
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
        if let Some(due) = self.next_due {
            let now = Instant::now();
            if due > now && self.wake.sleep_until(due) {
                return Ok(Captured::Interrupted);
            }
        }
        let captured_at = Instant::now();
        let data = self.grab()?;
        self.next_due = Some(next_due(self.next_due, captured_at, self.period));
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
        self.wake = wake;
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

/// When the frame after one grabbed at `grabbed_at` is due. Frames stay on the grid started by
/// the first one (no drift); if a grab ran late past a whole period, the grid restarts from the
/// grab rather than bursting to catch up.
fn next_due(due: Option<Instant>, grabbed_at: Instant, period: Duration) -> Instant {
    let next = due.unwrap_or(grabbed_at) + period;
    if next < grabbed_at {
        grabbed_at + period
    } else {
        next
    }
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

/// How the server lays out ZPixmap images of the root visual.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ImageLayout {
    depth: u8,
    /// 16 or 32.
    bits_per_pixel: u8,
    /// Each scanline is padded to a multiple of this many bits.
    scanline_pad: u8,
    /// Pixel values are stored most significant byte first.
    msb_first: bool,
    red_mask: u32,
    green_mask: u32,
    blue_mask: u32,
}

impl ImageLayout {
    /// The layout of `screen`'s root visual; errors for visuals sdcam cannot convert.
    fn for_screen(setup: &xproto::Setup, screen: &xproto::Screen) -> Result<ImageLayout> {
        let depth = screen.root_depth;
        let visual = screen
            .allowed_depths
            .iter()
            .flat_map(|d| d.visuals.iter())
            .find(|v| v.visual_id == screen.root_visual)
            .ok_or_else(|| anyhow!("the root visual of the X screen is not listed"))?;
        let format = setup
            .pixmap_formats
            .iter()
            .find(|f| f.depth == depth)
            .ok_or_else(|| anyhow!("the X server lists no pixmap format for depth {depth}"))?;
        let layout = ImageLayout {
            depth,
            bits_per_pixel: format.bits_per_pixel,
            scanline_pad: format.scanline_pad,
            msb_first: setup.image_byte_order == ImageOrder::MSB_FIRST,
            red_mask: visual.red_mask,
            green_mask: visual.green_mask,
            blue_mask: visual.blue_mask,
        };
        let true_color =
            visual.class == VisualClass::TRUE_COLOR || visual.class == VisualClass::DIRECT_COLOR;
        if !true_color || !layout.is_supported() {
            bail!(
                "unsupported screen depth {depth} ({} bits per pixel, {:?} visual); \
                 sdcam captures 15/16/24/32-bit TrueColor screens",
                layout.bits_per_pixel,
                visual.class
            );
        }
        Ok(layout)
    }

    /// Whether [`ImageLayout::convert_to_bgrx`] can convert this layout.
    fn is_supported(&self) -> bool {
        let bpp_ok = matches!(self.bits_per_pixel, 16 | 32);
        let pad_ok = matches!(self.scanline_pad, 8 | 16 | 32 | 64);
        let limit = if self.bits_per_pixel == 16 {
            0xffff
        } else {
            u32::MAX
        };
        let masks_ok = [self.red_mask, self.green_mask, self.blue_mask]
            .iter()
            .all(|&m| m != 0 && m <= limit && mask_width(m) <= 16);
        bpp_ok && pad_ok && masks_ok
    }

    /// The common case: little-endian 32-bit pixels with 8-bit channels in B, G, R, X order.
    fn is_native_bgrx(&self) -> bool {
        self.bits_per_pixel == 32
            && !self.msb_first
            && (self.red_mask, self.green_mask, self.blue_mask) == (0xff0000, 0xff00, 0xff)
    }

    /// Bytes a scanline `width` pixels wide occupies, padding included.
    fn stride(&self, width: u32) -> usize {
        let bits = width as usize * usize::from(self.bits_per_pixel);
        let pad = usize::from(self.scanline_pad.max(8));
        bits.div_ceil(pad) * pad / 8
    }

    /// Converts a `width` x `height` ZPixmap image into tightly packed BGRX bytes.
    fn convert_to_bgrx(&self, src: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
        let (w, h) = (width as usize, height as usize);
        let stride = self.stride(width);
        let bytes_pp = usize::from(self.bits_per_pixel / 8);
        let row_bytes = w * bytes_pp;
        let needed = if h == 0 {
            0
        } else {
            stride * (h - 1) + row_bytes
        };
        if src.len() < needed {
            bail!(
                "X image for {width}x{height} is {} bytes, expected at least {needed}",
                src.len()
            );
        }
        let mut out = Vec::with_capacity(w * h * 4);
        if self.is_native_bgrx() {
            for row in src.chunks(stride).take(h) {
                out.extend_from_slice(&row[..row_bytes]);
            }
            return Ok(out);
        }
        let channels = [
            Channel::new(self.blue_mask),
            Channel::new(self.green_mask),
            Channel::new(self.red_mask),
        ];
        for row in src.chunks(stride).take(h) {
            for px in row[..row_bytes].chunks_exact(bytes_pp) {
                let value = match (bytes_pp, self.msb_first) {
                    (2, false) => u32::from(u16::from_le_bytes([px[0], px[1]])),
                    (2, true) => u32::from(u16::from_be_bytes([px[0], px[1]])),
                    (_, false) => u32::from_le_bytes([px[0], px[1], px[2], px[3]]),
                    (_, true) => u32::from_be_bytes([px[0], px[1], px[2], px[3]]),
                };
                for c in &channels {
                    out.push(c.extract(value));
                }
                out.push(0xff);
            }
        }
        Ok(out)
    }
}

/// Number of bits between the lowest and highest set bit of `mask`.
fn mask_width(mask: u32) -> u32 {
    if mask == 0 {
        0
    } else {
        32 - mask.leading_zeros() - mask.trailing_zeros()
    }
}

/// One colour channel of a TrueColor pixel: where it sits and how to scale it to 8 bits.
#[derive(Debug, Clone, Copy)]
struct Channel {
    mask: u32,
    shift: u32,
    max: u32,
}

impl Channel {
    fn new(mask: u32) -> Channel {
        let shift = mask.trailing_zeros().min(31);
        let max = (mask >> shift).max(1);
        Channel { mask, shift, max }
    }

    /// The channel of `pixel`, scaled to 0..=255 with rounding.
    fn extract(&self, pixel: u32) -> u8 {
        let v = (pixel & self.mask) >> self.shift;
        if self.max == 0xff {
            v as u8
        } else {
            ((u64::from(v) * 255 + u64::from(self.max) / 2) / u64::from(self.max)) as u8
        }
    }
}

/// A System V shared-memory segment mapped into this process, optionally attached to the X server.
struct ShmSegment {
    id: libc::c_int,
    addr: *mut u8,
    size: usize,
    /// The X resource the server knows the segment by, once attached.
    seg: Option<shm::Seg>,
    removed: bool,
}

// SAFETY: the mapping is owned exclusively by this value and only read through `&self` after a
// completed (synchronous) ShmGetImage; moving it to another thread is sound.
unsafe impl Send for ShmSegment {}

impl ShmSegment {
    /// Creates and maps a private segment of `size` bytes (readable and writable by this user only).
    fn create(size: usize) -> Result<ShmSegment> {
        if size == 0 {
            bail!("cannot create an empty shared-memory segment");
        }
        // SAFETY: plain System V IPC calls; the returned id and address are checked.
        unsafe {
            let id = libc::shmget(libc::IPC_PRIVATE, size, libc::IPC_CREAT | 0o600);
            if id < 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("shmget of {size} bytes failed"));
            }
            let addr = libc::shmat(id, std::ptr::null(), 0);
            if addr as isize == -1 {
                let err = std::io::Error::last_os_error();
                libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
                return Err(err).context("shmat failed");
            }
            Ok(ShmSegment {
                id,
                addr: addr.cast(),
                size,
                seg: None,
                removed: false,
            })
        }
    }

    /// Marks the segment for destruction once every process has detached it.
    fn remove(&mut self) {
        if !self.removed {
            // SAFETY: `id` is a segment this value created.
            unsafe {
                libc::shmctl(self.id, libc::IPC_RMID, std::ptr::null_mut());
            }
            self.removed = true;
        }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `addr` maps `size` bytes for as long as `self` lives; the server writes into it
        // only while a ShmGetImage request is in flight, and callers read after its reply.
        unsafe { std::slice::from_raw_parts(self.addr, self.size) }
    }
}

impl Drop for ShmSegment {
    fn drop(&mut self) {
        self.remove();
        // SAFETY: `addr` came from shmat and is detached exactly once, here.
        unsafe {
            libc::shmdt(self.addr.cast());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bgrx_layout() -> ImageLayout {
        ImageLayout {
            depth: 24,
            bits_per_pixel: 32,
            scanline_pad: 32,
            msb_first: false,
            red_mask: 0xff0000,
            green_mask: 0xff00,
            blue_mask: 0xff,
        }
    }

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
    fn padded_rows_are_stripped() {
        // 16 bpp, 3 pixels wide: 6 bytes of pixels, padded to 8 per row.
        let layout = ImageLayout {
            depth: 16,
            bits_per_pixel: 16,
            scanline_pad: 32,
            msb_first: false,
            red_mask: 0xf800,
            green_mask: 0x07e0,
            blue_mask: 0x001f,
        };
        assert_eq!(layout.stride(3), 8);
        let red = 0xf800u16.to_le_bytes();
        let green = 0x07e0u16.to_le_bytes();
        let blue = 0x001fu16.to_le_bytes();
        let mut src = Vec::new();
        for _ in 0..2 {
            src.extend_from_slice(&red);
            src.extend_from_slice(&green);
            src.extend_from_slice(&blue);
            src.extend_from_slice(&[0xaa, 0xbb]); // padding
        }
        let out = layout.convert_to_bgrx(&src[..14], 3, 2).unwrap();
        let px = [0, 0, 255, 255, 0, 255, 0, 255, 255, 0, 0, 255];
        assert_eq!(out, [px, px].concat());
    }

    #[test]
    fn native_bgrx_rows_are_copied_without_padding() {
        let layout = ImageLayout {
            scanline_pad: 64,
            ..bgrx_layout()
        };
        // 1 pixel wide, padded to 8 bytes.
        assert_eq!(layout.stride(1), 8);
        let src = [1, 2, 3, 4, 9, 9, 9, 9, 5, 6, 7, 8];
        assert_eq!(
            layout.convert_to_bgrx(&src, 1, 2).unwrap(),
            [1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(bgrx_layout().stride(5), 20);
    }

    #[test]
    fn big_endian_and_short_images() {
        let layout = ImageLayout {
            msb_first: true,
            ..bgrx_layout()
        };
        // XRGB in memory order: x=0, r=0x11, g=0x22, b=0x33.
        let out = layout
            .convert_to_bgrx(&[0, 0x11, 0x22, 0x33], 1, 1)
            .unwrap();
        assert_eq!(out, [0x33, 0x22, 0x11, 0xff]);
        let err = bgrx_layout().convert_to_bgrx(&[0; 7], 1, 2).unwrap_err();
        assert!(err.to_string().contains("expected at least 8"), "{err}");
    }

    #[test]
    fn unsupported_layouts_are_detected() {
        assert!(bgrx_layout().is_supported());
        let packed24 = ImageLayout {
            bits_per_pixel: 24,
            ..bgrx_layout()
        };
        assert!(!packed24.is_supported());
        let eight = ImageLayout {
            depth: 8,
            bits_per_pixel: 8,
            ..bgrx_layout()
        };
        assert!(!eight.is_supported());
    }

    #[test]
    fn channel_scaling() {
        let five = Channel::new(0x001f);
        assert_eq!(five.extract(0x1f), 255);
        assert_eq!(five.extract(0), 0);
        assert_eq!(five.extract(0x10), 132);
        assert_eq!(Channel::new(0xff00).extract(0xab00), 0xab);
    }

    #[test]
    fn display_resolution() {
        assert_eq!(resolve_display(Some(":3"), Some(":0")).unwrap(), ":3");
        assert_eq!(resolve_display(None, Some(":0")).unwrap(), ":0");
        let err = resolve_display(None, None).unwrap_err();
        assert!(err.to_string().contains("$DISPLAY is not set"), "{err}");
        assert!(resolve_display(Some(" "), None).is_err());
    }

    #[test]
    fn pacing_keeps_the_grid_and_does_not_burst() {
        let t0 = Instant::now();
        let p = Duration::from_millis(10);
        // First frame starts the grid.
        assert_eq!(next_due(None, t0, p), t0 + p);
        // Slightly late: stay on the grid (no drift).
        assert_eq!(next_due(Some(t0 + p), t0 + p * 3 / 2, p), t0 + p * 2);
        // Late by more than a period: restart from the grab instead of bursting.
        assert_eq!(next_due(Some(t0 + p), t0 + p * 5, p), t0 + p * 6);
    }

    #[test]
    fn shm_segment_lifecycle() {
        let mut seg = ShmSegment::create(4096).unwrap();
        assert_eq!(seg.as_slice().len(), 4096);
        seg.remove();
        drop(seg);
    }
}
