//! The `sdcam devices` command: lists cameras (formats, sizes, rates) and v4l2loopback devices
//! (card labels, free or in use), with hints for what is missing (no V4L2 in the kernel, the
//! module not loaded, permissions). Probing is [`mod@crate::v4l2::probe`]; this is only the text.

use std::fmt::Write as _;

use crate::v4l2::{
    fourcc_to_string, modprobe_hint, probe_all, LoopbackState, V4l2Env, VideoDevice,
};

/// The `sdcam devices` listing for the devices present now.
pub fn report() -> String {
    render_report(&probe_all(), &V4l2Env::detect())
}

/// Renders the `sdcam devices` listing for a list of probed devices and what `/sys` says.
pub fn render_report(devices: &[VideoDevice], env: &V4l2Env) -> String {
    let mut out = String::new();
    let cameras: Vec<&VideoDevice> = devices.iter().filter(|d| d.is_camera()).collect();
    let loopbacks: Vec<&VideoDevice> = devices
        .iter()
        .filter(|d| d.error.is_none() && d.is_loopback)
        .collect();
    let others: Vec<&VideoDevice> = devices
        .iter()
        .filter(|d| d.error.is_none() && !d.is_loopback && !d.can_capture)
        .collect();
    let failed: Vec<&VideoDevice> = devices.iter().filter(|d| d.error.is_some()).collect();

    out.push_str("Cameras:\n");
    if cameras.is_empty() {
        out.push_str("  (none)\n");
    }
    for d in &cameras {
        let _ = writeln!(
            out,
            "  {}  {} ({}{})",
            d.path.display(),
            d.card,
            d.driver,
            if d.bus_info.is_empty() {
                String::new()
            } else {
                format!(", {}", d.bus_info)
            }
        );
        if d.formats.is_empty() {
            out.push_str("    (no formats reported)\n");
        }
        for f in &d.formats {
            let _ = writeln!(
                out,
                "    {} {}",
                fourcc_to_string(f.fourcc),
                f.sizes_summary()
            );
        }
    }

    out.push_str("Loopback devices:\n");
    if loopbacks.is_empty() {
        out.push_str("  (none)\n");
    }
    for d in &loopbacks {
        let state = match d.loopback_state {
            Some(LoopbackState::Free) => "free".to_string(),
            Some(LoopbackState::InUse(why)) => format!("in use by a writer ({})", why.describe()),
            Some(LoopbackState::NoWriterSeen) => {
                "free (exclusive_caps=0: no other sdcam, no frames arriving)".to_string()
            }
            Some(LoopbackState::Unknown(why)) => format!("free or in use ({why})"),
            None => "free or in use (not probed)".to_string(),
        };
        let _ = writeln!(
            out,
            "  {}  card label \"{}\": {state}",
            d.path.display(),
            d.card
        );
    }

    if !others.is_empty() {
        out.push_str("Other video devices:\n");
        for d in &others {
            let _ = writeln!(
                out,
                "  {}  {} ({}): no video capture",
                d.path.display(),
                d.card,
                d.driver
            );
        }
    }
    if !failed.is_empty() {
        out.push_str("Unreadable devices:\n");
        for d in &failed {
            let err = d.error.as_ref().map(|e| e.message.as_str()).unwrap_or("");
            let _ = writeln!(out, "  {}: {err}", d.path.display());
        }
    }

    let mut hints = Vec::new();
    if !env.v4l2_in_kernel && devices.is_empty() {
        hints.push(
            "no /sys/class/video4linux: this kernel has no V4L2 support (containers and some \
             cloud kernels lack it); run sdcam on the machine with the camera"
                .to_string(),
        );
    } else if devices.is_empty() {
        hints.push("no /dev/video* nodes (check with `ls -l /dev/video*`)".to_string());
    }
    if failed
        .iter()
        .any(|d| d.error.as_ref().is_some_and(|e| e.is_permission()))
    {
        hints.push(
            "permission denied: add your user to the `video` group (sudo usermod -aG video \
             $USER, then log in again) or install the udev rule from udev/ (see README)"
                .to_string(),
        );
    }
    if loopbacks.is_empty() {
        let load = modprobe_hint("sdcam");
        if env.loopback_loaded {
            hints.push(format!(
                "v4l2loopback is loaded but has no readable device; reload it: sudo modprobe -r \
                 v4l2loopback && {load}"
            ));
        } else {
            hints.push(format!(
                "no virtual camera: load the module with: {load} (install it with: sudo apt \
                 install v4l2loopback-dkms), or install the files from udev/ (see README)"
            ));
        }
    }
    for h in hints {
        let _ = writeln!(out, "Hint: {h}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v4l2::{DiscreteSize, FormatInfo, ProbeError, WriterEvidence, LOOPBACK_DRIVER};

    fn camera() -> VideoDevice {
        VideoDevice {
            path: "/dev/video0".into(),
            driver: "uvcvideo".into(),
            card: "HD Webcam".into(),
            bus_info: "usb-0000:00:14.0-1".into(),
            can_capture: true,
            formats: vec![
                FormatInfo::discrete(
                    *b"YUYV",
                    vec![
                        DiscreteSize::new(640, 480, &[30.0, 15.0]),
                        DiscreteSize::new(1280, 720, &[10.0]),
                    ],
                ),
                FormatInfo::discrete(*b"MJPG", vec![DiscreteSize::new(1280, 720, &[30.0])]),
            ],
            ..VideoDevice::default()
        }
    }

    #[test]
    fn report_lists_cameras_and_loopbacks() {
        let loopback = VideoDevice {
            path: "/dev/video10".into(),
            driver: LOOPBACK_DRIVER.into(),
            card: "sdcam".into(),
            is_loopback: true,
            can_output: true,
            loopback_state: Some(LoopbackState::Free),
            ..VideoDevice::default()
        };
        let busy = VideoDevice {
            path: "/dev/video11".into(),
            card: "other".into(),
            can_capture: true,
            can_output: false,
            loopback_state: Some(LoopbackState::InUse(WriterEvidence::CaptureOnly)),
            ..loopback.clone()
        };
        let denied = VideoDevice {
            path: "/dev/video3".into(),
            error: Some(ProbeError {
                errno: Some(libc::EACCES),
                message: "Permission denied (os error 13)".into(),
            }),
            ..VideoDevice::default()
        };
        let env = V4l2Env {
            v4l2_in_kernel: true,
            loopback_loaded: true,
        };
        let writing = VideoDevice {
            path: "/dev/video12".into(),
            card: "ec0".into(),
            can_capture: true,
            loopback_state: Some(LoopbackState::InUse(WriterEvidence::FramesArriving)),
            ..loopback.clone()
        };
        let quiet = VideoDevice {
            path: "/dev/video13".into(),
            card: "ec0-quiet".into(),
            can_capture: true,
            loopback_state: Some(LoopbackState::NoWriterSeen),
            ..loopback.clone()
        };
        let text = render_report(&[camera(), denied, loopback, busy, writing, quiet], &env);
        assert!(
            text.contains(
                "/dev/video12  card label \"ec0\": in use by a writer (frames from another \
                 program keep arriving)"
            ),
            "{text}"
        );
        assert!(
            text.contains("/dev/video13  card label \"ec0-quiet\": free (exclusive_caps=0"),
            "{text}"
        );
        assert!(
            text.contains("/dev/video0  HD Webcam (uvcvideo, usb-0000:00:14.0-1)"),
            "{text}"
        );
        assert!(text.contains("    YUYV 640x480@30,1280x720@10\n"), "{text}");
        assert!(text.contains("    MJPG 1280x720@30\n"), "{text}");
        assert!(
            text.contains("/dev/video10  card label \"sdcam\": free"),
            "{text}"
        );
        assert!(
            text.contains(
                "/dev/video11  card label \"other\": in use by a writer (it only offers capture now)"
            ),
            "{text}"
        );
        assert!(text.contains("/dev/video3: Permission denied"), "{text}");
        assert!(text.contains("`video` group"), "{text}");
        assert!(!text.contains("modprobe"), "{text}");
    }

    #[test]
    fn report_hints_when_nothing_found() {
        let text = render_report(
            &[],
            &V4l2Env {
                v4l2_in_kernel: false,
                loopback_loaded: false,
            },
        );
        assert!(text.contains("Cameras:\n  (none)"), "{text}");
        assert!(text.contains("no V4L2 support"), "{text}");
        assert!(
            text.contains("sudo modprobe v4l2loopback devices=1 video_nr=10 card_label=sdcam exclusive_caps=1 max_buffers=2"),
            "{text}"
        );
        let text = render_report(
            &[camera()],
            &V4l2Env {
                v4l2_in_kernel: true,
                loopback_loaded: false,
            },
        );
        assert!(!text.contains("V4L2 support"), "{text}");
        assert!(text.contains("v4l2loopback-dkms"), "{text}");
    }
}
