//! V4L2 four-character codes (`YUYV`, `MJPG`): the byte form sdcam matches on, the numeric form
//! ioctls take, and the printable form for messages and `sdcam devices`.
//!
//! `v4l::FourCC` holds the same four bytes, but its `Display` prints nothing for a code that is
//! not UTF-8 and knows neither the big-endian flag nor V4L2's space padding (`"Y8  "`), so sdcam
//! keeps a plain `[u8; 4]` and these few functions.

/// A V4L2 four-character code as its four bytes (`*b"YUYV"`).
pub type FourCc = [u8; 4];

/// The numeric form of a fourcc, as V4L2 ioctls want it.
pub const fn fourcc_to_u32(code: FourCc) -> u32 {
    u32::from_le_bytes(code)
}

/// The byte form of a numeric fourcc.
pub const fn fourcc_from_u32(code: u32) -> FourCc {
    code.to_le_bytes()
}

/// Printable form of a fourcc: `"YUYV"`, trailing spaces trimmed (`"Y8"`), non-printable codes
/// in hex. The big-endian flag (bit 31) is shown as a `-BE` suffix.
pub fn fourcc_to_string(code: FourCc) -> String {
    let value = fourcc_to_u32(code);
    let be = value & (1 << 31) != 0;
    let bytes = fourcc_from_u32(value & !(1 << 31));
    if bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        let s: String = bytes.iter().map(|&b| b as char).collect();
        let s = s.trim_end().to_string();
        if be {
            format!("{s}-BE")
        } else {
            s
        }
    } else {
        format!("0x{value:08x}")
    }
}

/// Parses a fourcc written as 1 to 4 printable ASCII characters (`"MJPG"`, `"Y8"`; shorter
/// codes are padded with spaces as V4L2 does). Case is kept: `"yuyv"` is not `"YUYV"`.
/// `None` for an empty, longer or non-printable code.
///
/// Nothing in sdcam parses a fourcc from text today (formats are chosen from what the device
/// lists); kept for its unit test, which pins V4L2's padding rule.
#[cfg(test)]
pub(crate) fn parse_fourcc(s: &str) -> Option<FourCc> {
    let bytes = s.as_bytes();
    if bytes.is_empty() || bytes.len() > 4 || !bytes.iter().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let mut code = [b' '; 4];
    code[..bytes.len()].copy_from_slice(bytes);
    Some(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fourcc_round_trip_and_parse() {
        assert_eq!(fourcc_to_u32(*b"YUYV"), 0x5659_5559);
        assert_eq!(fourcc_from_u32(0x5659_5559), *b"YUYV");
        assert_eq!(fourcc_to_string(*b"MJPG"), "MJPG");
        assert_eq!(fourcc_to_string(*b"Y8  "), "Y8");
        assert_eq!(fourcc_to_string([1, 2, 3, 4]), "0x04030201");
        assert_eq!(parse_fourcc("RGB3"), Some(*b"RGB3"));
        assert_eq!(parse_fourcc("Y8"), Some(*b"Y8  "));
        assert_eq!(parse_fourcc(""), None);
        assert_eq!(parse_fourcc("TOOLONG"), None);
        assert_eq!(parse_fourcc("A B"), None);
    }
}
