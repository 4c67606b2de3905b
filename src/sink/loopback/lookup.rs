//! Which v4l2loopback device the sink writes to, and whether it may: the lookup by card label
//! ([`find_loopback`]) and the checks on a probed node ([`check_loopback`]), with errors that say
//! exactly what to do (load the module, fix permissions, free the device, pick another label).
//! Pure functions over probed devices, tested without a device.

use std::path::{Path, PathBuf};

use crate::v4l2::{modprobe_hint, LoopbackState, V4l2Env, VideoDevice, WriterEvidence};

fn permission_hint() -> &'static str {
    "add your user to the `video` group (sudo usermod -aG video $USER, then log in again) or \
     install the udev rule from udev/ (see README)"
}

/// Checks that a probed node is a v4l2loopback device that can take a writer now.
pub fn check_loopback(dev: &VideoDevice) -> Result<(), String> {
    let path = dev.path.display();
    if let Some(e) = &dev.error {
        return Err(if e.is_permission() {
            format!("cannot open {path}: {}; {}", e.message, permission_hint())
        } else {
            format!("cannot open {path}: {}", e.message)
        });
    }
    if !dev.is_loopback {
        return Err(format!(
            "{path} is not a v4l2loopback device (driver \"{}\", card \"{}\"); give the loopback \
             device (see `sdcam devices`)",
            dev.driver, dev.card
        ));
    }
    let state = dev
        .loopback_state
        .unwrap_or_else(|| LoopbackState::from_caps(dev.can_capture, dev.can_output));
    if let LoopbackState::InUse(why) = state {
        return Err(in_use_message(&dev.path, &dev.card, why));
    }
    if !dev.can_output {
        return Err(format!(
            "{path} (\"{}\") offers no video output; give the loopback device (see `sdcam devices`)",
            dev.card
        ));
    }
    Ok(())
}

/// The error for a loopback device that another writer uses: how sdcam knows, and what to do.
pub fn in_use_message(path: &Path, card: &str, why: WriterEvidence) -> String {
    format!(
        "{} (\"{card}\") is in use by another writer ({}); close the other program writing to \
         it, or load the module with devices=2 for a second device",
        path.display(),
        why.describe()
    )
}

/// Finds the loopback device with card label `label` among probed devices; the error says
/// exactly what to do (load the module, fix permissions, free the device, pick another label).
pub fn find_loopback(
    devices: &[VideoDevice],
    label: &str,
    env: &V4l2Env,
) -> Result<PathBuf, String> {
    let labelled: Vec<&VideoDevice> = devices
        .iter()
        .filter(|d| d.error.is_none() && d.is_loopback && d.card.trim() == label.trim())
        .collect();
    let usable = |d: &&&VideoDevice| d.can_output && !d.loopback_state.is_some_and(|s| s.in_use());
    if let Some(d) = labelled.iter().find(usable) {
        return Ok(d.path.clone());
    }
    if let Some(d) = labelled.first() {
        return Err(check_loopback(d).err().unwrap_or_default());
    }
    let load = format!(
        "Load the module: {} (install it with: sudo apt install v4l2loopback-dkms), or install \
         the files from udev/ (see README)",
        modprobe_hint(label)
    );
    let not_found = format!("no v4l2loopback device with card_label \"{label}\" found");
    if !env.v4l2_in_kernel && devices.is_empty() {
        return Err(format!(
            "{not_found}: this kernel has no V4L2 support (/sys/class/video4linux is missing); \
             run sdcam on a machine whose kernel has V4L2 and v4l2loopback"
        ));
    }
    if !env.loopback_loaded {
        return Err(format!(
            "{not_found}: the v4l2loopback module is not loaded. {load}"
        ));
    }
    let denied: Vec<String> = devices
        .iter()
        .filter(|d| d.error.as_ref().is_some_and(|e| e.is_permission()))
        .map(|d| d.path.display().to_string())
        .collect();
    if !denied.is_empty() {
        return Err(format!(
            "{not_found}: permission denied on {}; {}",
            denied.join(", "),
            permission_hint()
        ));
    }
    let others: Vec<String> = devices
        .iter()
        .filter(|d| d.error.is_none() && d.is_loopback)
        .map(|d| format!("{} (\"{}\")", d.path.display(), d.card))
        .collect();
    if !others.is_empty() {
        return Err(format!(
            "{not_found}; loopback devices with other labels: {} — pass the device path, set the \
             label to match, or reload the module: sudo modprobe -r v4l2loopback && {}",
            others.join(", "),
            modprobe_hint(label)
        ));
    }
    Err(format!("{not_found}. {load}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v4l2::{ProbeError, LOOPBACK_DRIVER};

    fn loopback(path: &str, card: &str, output: bool) -> VideoDevice {
        VideoDevice {
            path: path.into(),
            driver: LOOPBACK_DRIVER.into(),
            card: card.into(),
            is_loopback: true,
            can_output: output,
            can_capture: !output,
            loopback_state: Some(LoopbackState::from_caps(!output, output)),
            ..VideoDevice::default()
        }
    }

    fn camera(path: &str) -> VideoDevice {
        VideoDevice {
            path: path.into(),
            driver: "uvcvideo".into(),
            card: "HD Webcam".into(),
            can_capture: true,
            ..VideoDevice::default()
        }
    }

    const LOADED: V4l2Env = V4l2Env {
        v4l2_in_kernel: true,
        loopback_loaded: true,
    };

    #[test]
    fn finds_loopback_by_label() {
        let list = vec![
            camera("/dev/video0"),
            loopback("/dev/video10", "OBS Virtual Camera", true),
            loopback("/dev/video11", "sdcam", true),
        ];
        assert_eq!(
            find_loopback(&list, "sdcam", &LOADED),
            Ok(PathBuf::from("/dev/video11"))
        );
        assert_eq!(
            find_loopback(&list, "OBS Virtual Camera", &LOADED),
            Ok(PathBuf::from("/dev/video10"))
        );
    }

    #[test]
    fn busy_loopback_is_reported() {
        let list = vec![loopback("/dev/video10", "sdcam", false)];
        let err = find_loopback(&list, "sdcam", &LOADED).unwrap_err();
        assert!(err.contains("in use by another writer"), "{err}");
        // A free one with the same label wins over a busy one.
        let list = vec![
            loopback("/dev/video10", "sdcam", false),
            loopback("/dev/video11", "sdcam", true),
        ];
        assert_eq!(
            find_loopback(&list, "sdcam", &LOADED),
            Ok(PathBuf::from("/dev/video11"))
        );
    }

    /// A loopback device with exclusive_caps=0 (both directions) in a given probe state.
    fn shared(path: &str, card: &str, state: LoopbackState) -> VideoDevice {
        VideoDevice {
            can_capture: true,
            can_output: true,
            loopback_state: Some(state),
            ..loopback(path, card, true)
        }
    }

    #[test]
    fn exclusive_caps_0_writers_are_reported() {
        for why in [
            WriterEvidence::SdcamLock,
            WriterEvidence::FramesArriving,
            WriterEvidence::OutputBusy,
        ] {
            let busy = shared("/dev/video10", "sdcam", LoopbackState::InUse(why));
            let err = find_loopback(std::slice::from_ref(&busy), "sdcam", &LOADED).unwrap_err();
            assert_eq!(
                err,
                format!(
                    "/dev/video10 (\"sdcam\") is in use by another writer ({}); close the other \
                     program writing to it, or load the module with devices=2 for a second device",
                    why.describe()
                )
            );
            assert_eq!(check_loopback(&busy).unwrap_err(), err);
        }
        // No writer seen, or the probes cannot tell: the device is used.
        for state in [
            LoopbackState::NoWriterSeen,
            LoopbackState::Unknown("exclusive_caps=0: cannot tell"),
        ] {
            let d = shared("/dev/video10", "sdcam", state);
            assert!(check_loopback(&d).is_ok(), "{state:?}");
            assert_eq!(
                find_loopback(&[d], "sdcam", &LOADED),
                Ok(PathBuf::from("/dev/video10"))
            );
        }
        // A free one with the same label wins over one another program writes to.
        let list = vec![
            shared(
                "/dev/video10",
                "sdcam",
                LoopbackState::InUse(WriterEvidence::FramesArriving),
            ),
            shared("/dev/video11", "sdcam", LoopbackState::NoWriterSeen),
        ];
        assert_eq!(
            find_loopback(&list, "sdcam", &LOADED),
            Ok(PathBuf::from("/dev/video11"))
        );
    }

    #[test]
    fn in_use_wording_names_the_evidence() {
        let text = |why| in_use_message(Path::new("/dev/video10"), "sdcam", why);
        assert!(text(WriterEvidence::CaptureOnly).contains("(it only offers capture now)"));
        assert!(text(WriterEvidence::SdcamLock).contains("(another sdcam is writing to it)"));
        assert!(text(WriterEvidence::FramesArriving)
            .contains("(frames from another program keep arriving)"));
        assert!(text(WriterEvidence::OutputBusy).contains("EBUSY"));
    }

    #[test]
    fn module_not_loaded() {
        let env = V4l2Env {
            v4l2_in_kernel: true,
            loopback_loaded: false,
        };
        let err = find_loopback(&[camera("/dev/video0")], "sdcam", &env).unwrap_err();
        assert_eq!(
            err,
            "no v4l2loopback device with card_label \"sdcam\" found: the v4l2loopback module is \
             not loaded. Load the module: sudo modprobe v4l2loopback devices=1 video_nr=10 \
             card_label=sdcam exclusive_caps=1 max_buffers=2 (install it with: sudo apt install \
             v4l2loopback-dkms), or install the files from udev/ (see README)"
        );
    }

    #[test]
    fn no_v4l2_in_kernel() {
        let env = V4l2Env {
            v4l2_in_kernel: false,
            loopback_loaded: false,
        };
        let err = find_loopback(&[], "sdcam", &env).unwrap_err();
        assert!(err.contains("no V4L2 support"), "{err}");
    }

    #[test]
    fn permission_denied_and_other_labels() {
        let denied = VideoDevice {
            path: "/dev/video10".into(),
            error: Some(ProbeError {
                errno: Some(libc::EACCES),
                message: "Permission denied (os error 13)".into(),
            }),
            ..VideoDevice::default()
        };
        let err = find_loopback(&[denied], "sdcam", &LOADED).unwrap_err();
        assert!(err.contains("permission denied on /dev/video10"), "{err}");
        assert!(err.contains("`video` group"), "{err}");
        let err = find_loopback(&[loopback("/dev/video10", "Dummy", true)], "sdcam", &LOADED)
            .unwrap_err();
        assert!(err.contains("/dev/video10 (\"Dummy\")"), "{err}");
        assert!(err.contains("card_label=sdcam"), "{err}");
        let err = find_loopback(&[], "sdcam", &LOADED).unwrap_err();
        assert!(err.contains("sudo modprobe v4l2loopback"), "{err}");
    }

    #[test]
    fn explicit_path_checks() {
        assert!(check_loopback(&loopback("/dev/sdcam", "sdcam", true)).is_ok());
        let err = check_loopback(&camera("/dev/video0")).unwrap_err();
        assert!(
            err.contains("not a v4l2loopback device (driver \"uvcvideo\""),
            "{err}"
        );
        let err = check_loopback(&loopback("/dev/video10", "sdcam", false)).unwrap_err();
        assert!(err.contains("in use by another writer"), "{err}");
    }
}
