//! The appliance's env file (`/etc/km/km.env`), in systemd `EnvironmentFile=` syntax.
//!
//! [`parse`] accepts a subset of what systemd reads, and reads it the same way; what
//! systemd would read surprisingly (text after a closing quote, a comment continued by a
//! trailing backslash, a line without `=`) is an error naming the line instead.
//! [`render`] writes values so that both systemd and [`parse`] read them back unchanged,
//! and [`write_atomic`] replaces the file so that a crash leaves the old or the new one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::iter::Peekable;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::Chars;

use crate::table::{self, Setting};

/// A problem in an env file, or an entry that cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvFileError {
    #[error("line {line}: {reason}")]
    Syntax { line: usize, reason: String },
    #[error("{key:?} cannot be written: {reason}")]
    Unwritable { key: String, reason: &'static str },
}

/// The `KEY=VALUE` entries in file order (systemd keeps the last of repeated keys).
pub fn parse(text: &str) -> Result<Vec<(String, String)>, EnvFileError> {
    let mut cursor = Cursor {
        chars: text.chars().peekable(),
        line: 1,
    };
    let mut entries = Vec::new();
    while let Some(c) = cursor.skip_while(|c| matches!(c, ' ' | '\t' | '\n' | '\r')) {
        if c == '#' || c == ';' {
            cursor.comment()?;
        } else {
            let key = cursor.key()?;
            let value = cursor.value()?;
            entries.push((key, value));
        }
    }
    Ok(entries)
}

/// The file text of `entries`: bare values when they are plain, else double-quoted.
pub fn render(entries: &[(String, String)]) -> String {
    let mut out = String::new();
    for (key, value) in entries {
        out.push_str(key);
        out.push('=');
        if value.chars().all(is_plain) {
            out.push_str(value);
        } else {
            out.push('"');
            for c in value.chars() {
                // The characters systemd (and a shell) unescape inside double quotes.
                if matches!(c, '"' | '\\' | '`' | '$') {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
        }
        out.push('\n');
    }
    out
}

/// Characters written without quotes: nothing systemd or a reader could misread.
fn is_plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.,:/@+%~^=".contains(c)
}

/// Whether entries can be rendered and read back: variable names, no NUL in values.
pub fn validate(entries: &[(String, String)]) -> Result<(), EnvFileError> {
    for (key, value) in entries {
        let reason = if !is_name(key) {
            "not a variable name (letters, digits and '_', not starting with a digit)"
        } else if value.contains('\0') {
            "the value contains a NUL character"
        } else {
            continue;
        };
        return Err(EnvFileError::Unwritable {
            key: key.clone(),
            reason,
        });
    }
    Ok(())
}

/// The names systemd accepts: `[A-Za-z_][A-Za-z0-9_]*`.
fn is_name(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Replaces `path` with `entries`, readable with `mode` (e.g. 0o640), atomically; the
/// file replaced is kept as `<path>.prev` (see [`restore_previous`]).
pub fn write_atomic(path: &Path, entries: &[(String, String)], mode: u32) -> io::Result<()> {
    validate(entries).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    match fs::read(path) {
        Ok(previous) => {
            let previous_mode = fs::metadata(path)?.permissions().mode() & 0o7777;
            replace(&previous_path(path), &previous, previous_mode)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    replace(path, render(entries).as_bytes(), mode)
}

/// Puts `<path>.prev` back in place of `path` (atomically, keeping `.prev`): the
/// rollback of a [`write_atomic`] whose settings did not work.
pub fn restore_previous(path: &Path) -> io::Result<()> {
    let prev = previous_path(path);
    let bytes = fs::read(&prev).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot read the previous version {}: {e}", prev.display()),
        )
    })?;
    let mode = fs::metadata(&prev)?.permissions().mode() & 0o7777;
    replace(path, &bytes, mode)
}

/// `<path>.prev`.
pub fn previous_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".prev");
    PathBuf::from(name)
}

/// Writes a temporary file beside `target`, syncs it, then renames it over `target` and
/// syncs the directory: readers see the old or the new content, never a part.
fn replace(target: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = target
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        km_stores::ids::random_hex(8)
    ));
    let written = write_synced(&tmp, bytes, mode).and_then(|()| fs::rename(&tmp, target));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    File::open(dir)?.sync_all()
}

fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    // Created with the final mode so the content is never readable more widely.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(bytes)?;
    // The umask may have narrowed the mode given at creation.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.sync_all()
}

/// Reads characters, counting lines for the errors.
struct Cursor<'a> {
    chars: Peekable<Chars<'a>>,
    line: usize,
}

/// systemd ends unquoted text at CR as well as LF.
fn is_eol(c: char) -> bool {
    c == '\n' || c == '\r'
}

impl Cursor<'_> {
    fn next(&mut self) -> Option<char> {
        let c = self.chars.next();
        if c == Some('\n') {
            self.line += 1;
        }
        c
    }

    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }

    /// Skips characters matching `skip`; the next one, not consumed.
    fn skip_while(&mut self, skip: impl Fn(char) -> bool) -> Option<char> {
        while let Some(c) = self.peek() {
            if !skip(c) {
                return Some(c);
            }
            self.next();
        }
        None
    }

    fn error(&self, line: usize, reason: impl Into<String>) -> EnvFileError {
        EnvFileError::Syntax {
            line,
            reason: reason.into(),
        }
    }

    /// A comment, to the end of the line.
    fn comment(&mut self) -> Result<(), EnvFileError> {
        let line = self.line;
        while let Some(c) = self.next() {
            match c {
                c if is_eol(c) => return Ok(()),
                // systemd before 254 continues a comment after a backslash-newline.
                '\\' if self.next() == Some('\n') => {
                    return Err(self.error(
                        line,
                        "the comment ends with '\\': systemd before version 254 would also ignore the next line",
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The name before `=`, checked.
    fn key(&mut self) -> Result<String, EnvFileError> {
        let line = self.line;
        let mut key = String::new();
        loop {
            match self.peek() {
                Some('=') => {
                    self.next();
                    break;
                }
                Some(c) if !is_eol(c) => {
                    key.push(c);
                    self.next();
                }
                _ => return Err(self.error(line, "expected KEY=VALUE")),
            }
        }
        let key = key.trim_end();
        if !is_name(key) {
            return Err(self.error(
                line,
                format!(
                    "{key:?} is not a variable name (letters, digits and '_', not starting with a digit)"
                ),
            ));
        }
        Ok(key.to_string())
    }

    /// The value after `=`: quoted, or bare to the end of the line.
    fn value(&mut self) -> Result<String, EnvFileError> {
        match self.skip_while(|c| c == ' ' || c == '\t') {
            Some(q @ ('"' | '\'')) => {
                let line = self.line;
                self.next();
                let value = self.quoted(q, line)?;
                self.end_of_line_after_quote(line)?;
                Ok(value)
            }
            _ => self.bare(),
        }
    }

    /// Inside quotes, newlines included; in double quotes `\` escapes `"`, `\`, `` ` ``,
    /// `$` and LF (joining lines), and is kept before anything else, as systemd does.
    fn quoted(&mut self, quote: char, line: usize) -> Result<String, EnvFileError> {
        let mut value = String::new();
        loop {
            match self.next() {
                None => {
                    return Err(
                        self.error(line, format!("the {quote} opened here is never closed"))
                    );
                }
                Some(c) if c == quote => return Ok(value),
                Some('\\') if quote == '"' => match self.next() {
                    None => {
                        return Err(
                            self.error(line, format!("the {quote} opened here is never closed"))
                        );
                    }
                    Some(c) if matches!(c, '"' | '\\' | '`' | '$') => value.push(c),
                    Some('\n') => {}
                    Some(c) => {
                        value.push('\\');
                        value.push(c);
                    }
                },
                Some(c) => value.push(c),
            }
        }
    }

    fn end_of_line_after_quote(&mut self, line: usize) -> Result<(), EnvFileError> {
        match self.skip_while(|c| c == ' ' || c == '\t') {
            None => Ok(()),
            Some(c) if is_eol(c) => Ok(()),
            Some(_) => Err(self.error(
                line,
                "text after the closing quote (systemd would append it to the value): quote the whole value",
            )),
        }
    }

    /// Unquoted: `\x` is `x`, backslash-newline joins lines, trailing blanks are dropped.
    fn bare(&mut self) -> Result<String, EnvFileError> {
        let mut value = String::new();
        let mut kept = 0;
        while let Some(c) = self.peek() {
            if is_eol(c) {
                break;
            }
            self.next();
            if c == '\\' {
                match self.next() {
                    None => return Err(self.error(self.line, "the file ends with '\\'")),
                    Some(c) if is_eol(c) => continue,
                    Some(c) => value.push(c),
                }
            } else {
                value.push(c);
                if c == ' ' || c == '\t' {
                    continue;
                }
            }
            kept = value.len();
        }
        value.truncate(kept);
        Ok(value)
    }
}

/// The last value of `key` in `entries` (systemd keeps the last of repeated keys).
pub fn variable<'a>(entries: &'a [(String, String)], key: &str) -> Option<&'a str> {
    entries
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The value `entries` give `setting` as `km serve` reads it: the last one, else the
/// default (an empty value is unset).
pub fn setting<'a>(entries: &'a [(String, String)], setting: &Setting) -> Option<&'a str> {
    setting.read(variable(entries, setting.var))
}

/// A listen address as this machine reaches it: through loopback when it listens on
/// every address.
pub fn local(listen: &str) -> String {
    listen
        .strip_prefix("0.0.0.0:")
        .or_else(|| listen.strip_prefix("[::]:"))
        .map_or_else(|| listen.to_string(), |port| format!("127.0.0.1:{port}"))
}

/// `/healthz` on the appliance's plain port (`KM_LISTEN`; it answers there even when
/// HTTPS is on), through loopback when it listens on every address.
pub fn health_url(entries: &[(String, String)]) -> String {
    let listen = setting(entries, &table::LISTEN).unwrap_or_default();
    format!("http://{}/healthz", local(listen))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn syntax_line(text: &str) -> usize {
        match parse(text) {
            Err(EnvFileError::Syntax { line, .. }) => line,
            other => panic!("{text:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn reads_what_systemd_reads() {
        let text = "# comment\n; also a comment\n\n  KM_A=plain\nKM_B = spaced out  \n\
            KM_C='single \"q\" \\n'\nKM_D=\"dq \\\" \\\\ \\$ \\` \\n\"\nKM_E=\nKM_F=a\\ \\\nb\n\
            KM_G=\"multi\nline\"\nKM_H=x#y=z\r\nKM_I=trailing\\ \nKM_J=\"cr\\\r\"\nKM_A=again\n";
        assert_eq!(
            parse(text).unwrap(),
            pairs(&[
                ("KM_A", "plain"),
                ("KM_B", "spaced out"),
                ("KM_C", "single \"q\" \\n"),
                ("KM_D", "dq \" \\ $ ` \\n"),
                ("KM_E", ""),
                ("KM_F", "a b"),
                ("KM_G", "multi\nline"),
                ("KM_H", "x#y=z"),
                ("KM_I", "trailing "),
                ("KM_J", "cr\\\r"),
                ("KM_A", "again"),
            ])
        );
    }

    #[test]
    fn bad_lines_are_named() {
        assert_eq!(syntax_line("KM_A=1\n\nnot a setting\n"), 3);
        assert_eq!(syntax_line("KM_A=1\n9KM=2\n"), 2);
        assert_eq!(syntax_line("KM A=1\n"), 1);
        assert_eq!(syntax_line("KM_A=1\nKM_B=\"open\n\nstill\n"), 2);
        assert_eq!(syntax_line("KM_A='x' y\n"), 1);
        assert_eq!(syntax_line("# c:\\\nKM_A=1\n"), 1);
        assert_eq!(syntax_line("KM_A=x\\"), 1);
        let err = parse("KM_A=1\n=x\n").unwrap_err().to_string();
        assert!(
            err.starts_with("line 2: \"\" is not a variable name"),
            "{err}"
        );
    }

    #[test]
    fn tricky_values_round_trip() {
        let entries = pairs(&[
            ("EMPTY", ""),
            ("SPACES", "  two  spaces  "),
            ("QUOTES", r#"it's "quoted""#),
            ("HASH", "#not a comment"),
            ("EQUALS", "a=b=c"),
            ("DOLLAR", "$HOME ${X} `cmd`"),
            ("BACKSLASH", r"C:\path\ \n \\"),
            ("NEWLINE", "one\ntwo\r\n"),
            ("SEMI", ";x"),
            (
                "URL",
                "mongodb+srv://u:p%40ss@db.example.com/km?retryWrites=true",
            ),
            ("PLAIN", "https://km.example.com:8443/x"),
            ("UNICODE", "café ☕\t"),
        ]);
        let text = render(&entries);
        assert_eq!(parse(&text).unwrap(), entries, "{text}");
        assert!(
            text.contains("\nPLAIN=https://km.example.com:8443/x\n"),
            "{text}"
        );
        assert!(text.contains("EMPTY=\n"));
    }

    #[test]
    fn unwritable_entries_are_refused() {
        assert!(validate(&pairs(&[("1X", "v")])).is_err());
        assert!(validate(&pairs(&[("X", "a\0b")])).is_err());
        assert!(validate(&pairs(&[("_X1", "v")])).is_ok());
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn writes_atomically_keeps_and_restores_the_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("km.env");
        let first = pairs(&[("KM_SITE_URL", "https://a.example.com")]);
        write_atomic(&path, &first, 0o640).unwrap();
        assert_eq!(mode(&path), 0o640);
        assert!(!previous_path(&path).exists());

        let second = pairs(&[("SMTP_PASSWORD", "s3cret \"x\"")]);
        write_atomic(&path, &second, 0o600).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(parse(&fs::read_to_string(&path).unwrap()).unwrap(), second);
        let prev = previous_path(&path);
        assert_eq!(prev, dir.path().join("km.env.prev"));
        assert_eq!(parse(&fs::read_to_string(&prev).unwrap()).unwrap(), first);
        assert_eq!(mode(&prev), 0o640);

        restore_previous(&path).unwrap();
        assert_eq!(parse(&fs::read_to_string(&path).unwrap()).unwrap(), first);
        assert_eq!(mode(&path), 0o640);
        // Only the file and its previous version: no temporary file left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn refused_entries_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("km.env");
        write_atomic(&path, &pairs(&[("A", "1")]), 0o600).unwrap();
        let err = write_atomic(&path, &pairs(&[("BAD NAME", "1")]), 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(fs::read_to_string(&path).unwrap(), "A=1\n");
        assert!(!previous_path(&path).exists());
    }

    #[test]
    fn restore_without_previous_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let err = restore_previous(&dir.path().join("km.env")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("km.env.prev"), "{err}");
    }
}
