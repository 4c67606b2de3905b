//! Live control: commands typed on stdin (one a line) and Unix signals, delivered as
//! [`Event`]s to the run loop, which applies them without restarting the relay.
//!
//! stdin: `prompt <text>`, `negative <text>`, `set <key> <value>`, `get <key>`, `profile <path>`,
//! `reload`, `next`, `pause`, `resume`, `snapshot <file.png>`, `stats`, `help`, `quit`.
//! Signals: SIGHUP reloads the profile file, SIGUSR2 advances the prompt playlist, SIGUSR1
//! prints stats, SIGINT/SIGTERM stop gracefully (a second one exits at once).

pub mod session;

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use crossbeam_channel::{unbounded, Receiver, Sender};

/// A parsed control command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Prompt(String),
    Negative(String),
    Set {
        key: String,
        value: String,
    },
    Get(String),
    Profile(PathBuf),
    Reload,
    Next,
    Pause,
    Resume,
    /// The on-demand camera: `wake` / `sleep` force the state, `auto` follows the readers.
    Demand(crate::relay::demand::Command),
    Snapshot(PathBuf),
    Stats,
    Help,
    Quit,
}

/// Something the run loop must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Command(Command),
    /// A line that did not parse: the message to print. Nothing changes.
    Invalid(String),
    /// stdin was closed (not an error: CI and pipes have no stdin).
    InputClosed,
    /// SIGINT/SIGTERM.
    Stop,
}

pub const HELP: &str = "\
commands (one per line):
  prompt <text>          change the prompt
  negative <text>        change the negative prompt
  set <key> <value>      change any profile key, e.g. `set guidance_scale 1.5`, `set t_index_list [32, 45]`
  get <key>              print a setting
  profile <path>         switch to another profile file
  reload                 re-read the current profile file (also: SIGHUP)
  next                   next prompt of the profile's `prompts` playlist (also: SIGUSR2)
  pause / resume         freeze / unfreeze the output on the current frame
  wake / sleep / auto    on-demand camera: force live / force idle / follow the viewers again
  snapshot <file.png>    save the next output frame
  stats                  print statistics (also: SIGUSR1)
  quit                   stop (also: Ctrl-C, SIGTERM)";

/// Parses one command line. Blank lines and `#` comments give `Ok(None)`.
fn is_empty_quotes(s: &str) -> bool {
    s == "\"\"" || s == "''"
}

pub fn parse(line: &str) -> Result<Option<Command>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let (word, rest) = match line.split_once(char::is_whitespace) {
        Some((w, r)) => (w, r.trim()),
        None => (line, ""),
    };
    let need = |what: &str| -> Result<String, String> {
        if rest.is_empty() {
            Err(format!("`{word}` needs {what} (try `help`)"))
        } else {
            Ok(rest.to_string())
        }
    };
    let none = |c: Command| -> Result<Option<Command>, String> {
        if rest.is_empty() {
            Ok(Some(c))
        } else {
            Err(format!("`{word}` takes no arguments"))
        }
    };
    match word.to_ascii_lowercase().as_str() {
        // `prompt ""` is the empty prompt, as `prompt = ""` is in a profile (diffusers accepts it:
        // unconditional generation); a bare `prompt` still asks for the text.
        "prompt" if is_empty_quotes(rest) => Ok(Some(Command::Prompt(String::new()))),
        "prompt" => Ok(Some(Command::Prompt(need(
            "the prompt text (\"\" for none)",
        )?))),
        "negative" | "negative_prompt" if is_empty_quotes(rest) => {
            Ok(Some(Command::Negative(String::new())))
        }
        "negative" | "negative_prompt" => Ok(Some(Command::Negative(rest.to_string()))),
        "set" => {
            let text = need("a key and a value")?;
            match text.split_once(char::is_whitespace) {
                Some((k, v)) if !v.trim().is_empty() => Ok(Some(Command::Set {
                    key: k.to_string(),
                    value: v.trim().to_string(),
                })),
                _ => Err(format!("`set {text}` needs a value: set <key> <value>")),
            }
        }
        "get" => Ok(Some(Command::Get(need("a key")?))),
        "profile" => Ok(Some(Command::Profile(PathBuf::from(need(
            "a profile path",
        )?)))),
        "snapshot" => Ok(Some(Command::Snapshot(PathBuf::from(need(
            "a .png file name",
        )?)))),
        "reload" => none(Command::Reload),
        "next" => none(Command::Next),
        "pause" => none(Command::Pause),
        "resume" => none(Command::Resume),
        "wake" => none(Command::Demand(crate::relay::demand::Command::Wake)),
        "sleep" => none(Command::Demand(crate::relay::demand::Command::Sleep)),
        "auto" => none(Command::Demand(crate::relay::demand::Command::Auto)),
        "stats" => none(Command::Stats),
        "help" | "?" => none(Command::Help),
        "quit" | "exit" => none(Command::Quit),
        other => Err(format!("unknown command `{other}` (try `help`)")),
    }
}

/// Reads commands from stdin on a thread until EOF. Never ends the run by itself.
pub fn spawn_stdin(events: Sender<Event>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("sdcam-stdin".into())
        .spawn(move || {
            if read_commands(std::io::stdin().lock(), &events) {
                let _ = events.send(Event::InputClosed);
            }
        })?;
    Ok(())
}

/// The longest command line read (a prompt is at most a few hundred bytes); longer lines are
/// reported and skipped without being held in memory.
pub const MAX_LINE: usize = 64 * 1024;

/// Turns lines of `input` into events until EOF or a read error. A line that is not UTF-8 or
/// longer than [`MAX_LINE`] is reported as invalid and reading goes on. Returns false when the
/// receiver is gone.
pub fn read_commands(input: impl BufRead, events: &Sender<Event>) -> bool {
    read_commands_limited(input, events, MAX_LINE)
}

/// [`read_commands`] with the line limit `max_line` (at least 1) as a parameter, so that
/// [`crate::fuzzing::command`] reaches the over-long-line path with short inputs.
pub(crate) fn read_commands_limited(
    mut input: impl BufRead,
    events: &Sender<Event>,
    max_line: usize,
) -> bool {
    let max_line = max_line.max(1);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = match std::io::Read::take(&mut input, max_line as u64 + 1)
            .read_until(b'\n', &mut buf)
        {
            Ok(0) | Err(_) => return true,
            Ok(n) => n,
        };
        let ev = if n > max_line && buf.last() != Some(&b'\n') {
            // Skip the rest of the over-long line.
            let mut rest = Vec::new();
            while let Ok(k) =
                std::io::Read::take(&mut input, max_line as u64).read_until(b'\n', &mut rest)
            {
                if k == 0 || rest.last() == Some(&b'\n') {
                    break;
                }
                rest.clear();
            }
            let limit = if max_line.is_multiple_of(1024) {
                format!("{} KiB", max_line / 1024)
            } else {
                format!("{max_line} bytes")
            };
            Event::Invalid(format!("a command line longer than {limit}, ignored"))
        } else {
            while matches!(buf.last(), Some(b'\n' | b'\r')) {
                buf.pop();
            }
            match std::str::from_utf8(&buf) {
                Err(e) => Event::Invalid(format!(
                    "a command line that is not UTF-8 (byte {} of {:?}): set the terminal to \
                     UTF-8; the line was ignored",
                    e.valid_up_to(),
                    String::from_utf8_lossy(&buf)
                        .chars()
                        .take(60)
                        .collect::<String>()
                )),
                Ok(line) => match parse(line) {
                    Ok(Some(c)) => Event::Command(c),
                    Ok(None) => continue,
                    Err(msg) => Event::Invalid(msg),
                },
            }
        };
        if events.send(ev).is_err() {
            return false;
        }
    }
}

/// The control channel of a run, set up before anything slow (the first thing `sdcam run`
/// does): from then on signals are caught, and their events wait in the channel until the run
/// loop reads them, so a SIGTERM during start-up stops the run cleanly instead of killing it.
pub struct Control {
    pub tx: Sender<Event>,
    pub rx: Receiver<Event>,
    /// Set as soon as a stop is asked for (before its event is read), so that waits in the run
    /// loop (an acknowledgement from a slow stage) can give up at once.
    pub stop: Arc<AtomicBool>,
}

impl Control {
    /// A channel without signal handlers (tests, embedding).
    pub fn new() -> Self {
        let (tx, rx) = unbounded();
        Control {
            tx,
            rx,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A channel fed by the signal handlers, installed now.
    pub fn with_signals() -> std::io::Result<Self> {
        let c = Control::new();
        spawn_signals(c.tx.clone(), c.stop.clone())?;
        Ok(c)
    }

    /// Whether a stop was asked for.
    pub fn stopping(&self) -> bool {
        self.stop.load(Relaxed)
    }
}

impl Default for Control {
    fn default() -> Self {
        Control::new()
    }
}

/// One piece of work for the run loop, after [`coalesce`].
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// Stop now: nothing else in the batch is done.
    Stop,
    /// Advance the prompt playlist by this many positions, applying once.
    Next(usize),
    /// Any other event, in order.
    Event(Event),
}

/// Turns a batch of queued events into the work to do: a stop (signal or `quit`) anywhere in
/// the batch preempts everything else; a run of reloads is one reload; a run of `next` is one
/// `Next(n)` (n positions, applied once); a run of prompt (or negative prompt) changes keeps
/// only the last one; a run of `stats` prints once. Everything else keeps its order.
pub fn coalesce(batch: impl IntoIterator<Item = Event>) -> Vec<Work> {
    let batch: Vec<Event> = batch.into_iter().collect();
    if batch
        .iter()
        .any(|e| matches!(e, Event::Stop | Event::Command(Command::Quit)))
    {
        return vec![Work::Stop];
    }
    let mut out: Vec<Work> = Vec::new();
    for ev in batch {
        let merged = match (out.last_mut(), &ev) {
            (Some(Work::Next(n)), Event::Command(Command::Next)) => {
                *n += 1;
                true
            }
            (Some(Work::Event(Event::Command(last))), Event::Command(c)) => {
                let same = matches!(
                    (&*last, c),
                    (Command::Reload, Command::Reload)
                        | (Command::Stats, Command::Stats)
                        | (Command::Prompt(_), Command::Prompt(_))
                        | (Command::Negative(_), Command::Negative(_))
                );
                if same {
                    *last = c.clone();
                }
                same
            }
            _ => false,
        };
        if !merged {
            out.push(match ev {
                Event::Command(Command::Next) => Work::Next(1),
                ev => Work::Event(ev),
            });
        }
    }
    out
}

/// Turns SIGHUP/SIGUSR1/SIGUSR2/SIGINT/SIGTERM into events; a stop also sets `stop` at once.
/// A second SIGINT/SIGTERM exits at once.
pub fn spawn_signals(events: Sender<Event>, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2])?;
    std::thread::Builder::new()
        .name("sdcam-signals".into())
        .spawn(move || {
            let mut stopping = false;
            for sig in signals.forever() {
                let ev = match sig {
                    SIGHUP => Event::Command(Command::Reload),
                    SIGUSR1 => Event::Command(Command::Stats),
                    SIGUSR2 => Event::Command(Command::Next),
                    _ if stopping => {
                        eprintln!("sdcam: second stop signal, exiting now");
                        std::process::exit(130);
                    }
                    _ => {
                        stopping = true;
                        stop.store(true, Relaxed);
                        Event::Stop
                    }
                };
                if events.send(ev).is_err() {
                    return;
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(c: Command) -> Event {
        Event::Command(c)
    }

    /// A stop anywhere in a batch preempts the queued work; runs of reloads, `next`, prompts and
    /// `stats` collapse (N `next` advance N positions once); other events keep their order.
    #[test]
    fn coalesce_lets_stop_preempt_and_merges_repeats() {
        let mut burst: Vec<Event> = (0..20)
            .flat_map(|_| [cmd(Command::Reload), cmd(Command::Next)])
            .collect();
        burst.push(Event::Stop);
        burst.push(cmd(Command::Reload));
        assert_eq!(coalesce(burst), vec![Work::Stop]);
        assert_eq!(
            coalesce([cmd(Command::Prompt("a".into())), cmd(Command::Quit)]),
            vec![Work::Stop]
        );
        let batch = vec![
            cmd(Command::Reload),
            cmd(Command::Reload),
            cmd(Command::Reload),
            cmd(Command::Next),
            cmd(Command::Next),
            cmd(Command::Next),
            cmd(Command::Prompt("a".into())),
            cmd(Command::Prompt("b".into())),
            cmd(Command::Set {
                key: "delta".into(),
                value: "0.5".into(),
            }),
            cmd(Command::Stats),
            cmd(Command::Stats),
            Event::InputClosed,
            cmd(Command::Next),
            cmd(Command::Reload),
        ];
        assert_eq!(
            coalesce(batch),
            vec![
                Work::Event(cmd(Command::Reload)),
                Work::Next(3),
                Work::Event(cmd(Command::Prompt("b".into()))),
                Work::Event(cmd(Command::Set {
                    key: "delta".into(),
                    value: "0.5".into(),
                })),
                Work::Event(cmd(Command::Stats)),
                Work::Event(Event::InputClosed),
                Work::Next(1),
                Work::Event(cmd(Command::Reload)),
            ]
        );
        assert_eq!(coalesce(Vec::new()), Vec::new());
    }

    /// The empty prompt is allowed live as in a profile.
    #[test]
    fn empty_prompt_is_one_rule() {
        assert_eq!(
            parse("prompt \"\""),
            Ok(Some(Command::Prompt(String::new())))
        );
        assert_eq!(parse("prompt ''"), Ok(Some(Command::Prompt(String::new()))));
        assert_eq!(
            parse("negative \"\""),
            Ok(Some(Command::Negative(String::new())))
        );
        assert!(parse("prompt").is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.toml");
        std::fs::write(&p, "prompt = \"\"\n").unwrap();
        let lp = crate::profile::LoadedProfile::load(&p).unwrap();
        assert_eq!(lp.profile.prompt, "");
    }

    /// Seeded mutation fuzzing of the command parser (bounded: 5000 lines): no line panics.
    #[test]
    fn mutated_command_lines_never_panic() {
        use rand::{Rng, SeedableRng};
        let bases = [
            "prompt a cat",
            "set guidance_scale 1.5",
            "set t_index_list [32, 45]",
            "get stream.delta",
            "profile p.toml",
            "snapshot s.png",
            "negative blurry",
            "quit",
        ];
        let tokens = [
            "\u{e9}",
            "\u{1f600}",
            " ",
            "[",
            "\"",
            "=",
            "\t",
            "\u{0}",
            "set",
            ".",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5dca);
        for n in 0..5000 {
            let mut line: Vec<char> = bases[n % bases.len()].chars().collect();
            for _ in 0..rng.random_range(1..5) {
                let at = rng.random_range(0..=line.len());
                match rng.random_range(0..3) {
                    0 => line.insert(at, char::from(rng.random_range(0x20u8..0x7f))),
                    1 if at < line.len() => {
                        line.remove(at);
                    }
                    _ => {
                        let tok = tokens[rng.random_range(0..tokens.len())];
                        for (i, c) in tok.chars().enumerate() {
                            line.insert(at + i, c);
                        }
                    }
                }
            }
            let _ = parse(&line.into_iter().collect::<String>());
        }
    }

    /// A Latin-1 line (`prompt caf\xe9`) or an endless line is reported and reading goes on, so a
    /// later `quit` still arrives.
    #[test]
    fn bad_lines_are_reported_and_reading_continues() {
        let mut input = b"prompt caf\xe9\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 3 * MAX_LINE));
        input.extend_from_slice(b"\nstats\n\n\xff\xfe\nquit\n");
        let (tx, rx) = crossbeam_channel::unbounded();
        assert!(read_commands(std::io::Cursor::new(input), &tx));
        let events: Vec<Event> = rx.try_iter().collect();
        assert_eq!(events.len(), 5, "{events:?}");
        assert!(
            matches!(&events[0], Event::Invalid(m) if m.contains("not UTF-8") && m.contains("caf"))
        );
        assert!(matches!(&events[1], Event::Invalid(m) if m.contains("longer than")));
        assert_eq!(events[2], Event::Command(Command::Stats));
        assert!(matches!(&events[3], Event::Invalid(m) if m.contains("not UTF-8")));
        assert_eq!(events[4], Event::Command(Command::Quit));
    }

    #[test]
    fn parses_commands() {
        assert_eq!(
            parse("prompt  a cat, oil painting "),
            Ok(Some(Command::Prompt("a cat, oil painting".into())))
        );
        assert_eq!(
            parse("negative"),
            Ok(Some(Command::Negative(String::new())))
        );
        assert_eq!(
            parse("set t_index_list [32, 45]"),
            Ok(Some(Command::Set {
                key: "t_index_list".into(),
                value: "[32, 45]".into()
            }))
        );
        assert_eq!(parse("PAUSE"), Ok(Some(Command::Pause)));
        assert_eq!(
            parse("snapshot out/a.png"),
            Ok(Some(Command::Snapshot("out/a.png".into())))
        );
        assert_eq!(parse("  # comment"), Ok(None));
        assert_eq!(parse(""), Ok(None));
    }

    #[test]
    fn rejects_malformed_commands() {
        assert!(parse("prompt")
            .unwrap_err()
            .contains("needs the prompt text"));
        assert!(parse("set guidance_scale")
            .unwrap_err()
            .contains("needs a value"));
        assert!(parse("pause now")
            .unwrap_err()
            .contains("takes no arguments"));
        assert!(parse("fly away")
            .unwrap_err()
            .contains("unknown command `fly`"));
    }
}
