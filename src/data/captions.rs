//! Captions: a sidecar `NAME.txt` beside the image, else the image's line in
//! a `metadata.jsonl` of its folder or one above (`file_name`, `text`, as
//! Hugging Face's imagefolder), else the config's caption template. The
//! trigger word replaces `[trigger]`, or is prepended when the caption does
//! not already hold it. Missing, empty and non-UTF-8 captions are noted.
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use super::scan::Found;

/// Where a caption came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Sidecar,
    Metadata,
    Template,
    Trigger,
    None,
}

/// Something wrong with an image's own caption (the image is still used).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Issue {
    /// No sidecar and no metadata line.
    Missing,
    /// The caption file or line is empty.
    Empty {
        file: String,
    },
    NotUtf8 {
        file: String,
    },
    /// The sidecar exists but cannot be read (permissions, I/O).
    Unreadable {
        file: String,
        error: String,
    },
}

#[derive(Clone, Debug)]
pub struct Caption {
    /// The final text, trigger applied.
    pub text: String,
    pub source: Source,
    pub issue: Option<Issue>,
}

/// A problem with a caption source file itself (not tied to one image).
#[derive(Clone, Debug)]
pub struct FileProblem {
    pub rel: String,
    pub message: String,
}

/// One usable line of a `metadata.jsonl`.
#[derive(Clone, Debug)]
pub struct MetadataLine {
    /// The metadata file, as messages show it.
    pub file: String,
    /// 1-based.
    pub line: usize,
    pub file_name: String,
    text: String,
    /// Folders between the data folder and the metadata file.
    depth: usize,
}

/// Every caption source of the data folder, looked up per image.
#[derive(Default)]
pub struct Captions {
    /// Image path without extension -> its sidecar.
    sidecars: HashMap<PathBuf, Found>,
    /// Normalised image path -> its metadata line.
    metadata: HashMap<PathBuf, MetadataLine>,
    pub problems: Vec<FileProblem>,
    template: Option<String>,
    trigger: Option<String>,
}

impl Captions {
    pub fn new(sidecars: &[Found], metadata_files: &[Found], template: Option<&str>, trigger: Option<&str>) -> Self {
        let mut captions = Captions {
            template: template.map(str::trim).filter(|t| !t.is_empty()).map(String::from),
            trigger: trigger.map(str::trim).filter(|t| !t.is_empty()).map(String::from),
            ..Default::default()
        };
        for found in sidecars {
            captions.sidecars.insert(found.path.with_extension(""), found.clone());
        }
        for found in metadata_files {
            captions.read_metadata(found);
        }
        captions
    }

    /// The same caption sources with another template and trigger (a
    /// concept's); problems with the source files stay with `self`.
    pub fn with_rules(&self, template: Option<&str>, trigger: Option<&str>) -> Self {
        Captions {
            sidecars: self.sidecars.clone(),
            metadata: self.metadata.clone(),
            problems: Vec::new(),
            template: template.map(str::trim).filter(|t| !t.is_empty()).map(String::from),
            trigger: trigger.map(str::trim).filter(|t| !t.is_empty()).map(String::from),
        }
    }

    /// Reads one `metadata.jsonl`. A bad line (not UTF-8, not JSON, no
    /// `file_name` or `text`) costs only itself: one problem naming the
    /// line, every other line's caption kept.
    fn read_metadata(&mut self, found: &Found) {
        let bytes = match std::fs::read(&found.path) {
            Ok(b) => b,
            Err(e) => {
                self.problem(found, format!("cannot be read ({e}); check the file's permissions"));
                return;
            }
        };
        // UTF-16 (as Windows Notepad may save) fails on every line; say so once.
        if bytes.starts_with(&[0xFF, 0xFE]) || bytes.starts_with(&[0xFE, 0xFF]) {
            self.problem(found, "is UTF-16 text, so none of its captions were read; save it as UTF-8".into());
            return;
        }
        let dir = found.path.parent().unwrap_or(Path::new(""));
        let depth = found.rel.matches('/').count();
        for (n, line) in lines(&bytes).enumerate() {
            let number = n + 1;
            let Ok(line) = std::str::from_utf8(line) else {
                self.problem(found, format!("line {number} is not UTF-8 text, so its caption was not read; save the file as UTF-8"));
                continue;
            };
            // A UTF-8 byte-order mark may open the file (or a line pasted from one).
            let line = line.trim_start_matches('\u{feff}').trim();
            if line.is_empty() {
                continue;
            }
            let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
            let entry = parsed.ok().and_then(|v| {
                let name = v.get("file_name")?.as_str()?.to_string();
                let text = v.get("text").and_then(|t| t.as_str()).map(String::from);
                Some((name, text))
            });
            match entry {
                Some((name, Some(text))) => {
                    let key = normalise(&dir.join(&name));
                    let entry = MetadataLine { file: found.rel.clone(), line: number, file_name: name.clone(), text, depth };
                    // Of two lines for one image, the nearer file's wins, else the later line.
                    let kept = match self.metadata.get(&key) {
                        Some(old) if old.depth > depth => {
                            let message = format!(
                                "line {number} gives {name:?} a caption, but {} line {} nearer the image gives it one too, which is used; remove one",
                                old.file, old.line
                            );
                            self.problem(found, message);
                            false
                        }
                        Some(old) => {
                            let first = if old.file == found.rel { format!("line {}", old.line) } else { format!("{} line {}", old.file, old.line) };
                            self.problem(
                                found,
                                format!("line {number} gives {name:?} a second caption ({first} gave the first); this one is used, remove the other"),
                            );
                            true
                        }
                        None => true,
                    };
                    if kept {
                        self.metadata.insert(key, entry);
                    }
                }
                Some((name, None)) => self.problem(
                    found,
                    format!("line {number}: the entry for {name:?} has no \"text\" string, so that image has no caption from it; add one"),
                ),
                None => self.problem(
                    found,
                    format!(
                        "line {number} is not a JSON object with \"file_name\" and \"text\" strings, so its caption was not read; fix or remove that line"
                    ),
                ),
            }
        }
    }

    fn problem(&mut self, found: &Found, message: String) {
        self.problems.push(FileProblem { rel: found.rel.clone(), message });
    }

    /// Whether `path` (a `.txt` file) is the sidecar of one of `images`.
    pub fn sidecar_path_for(&self, image: &Path) -> Option<&Found> {
        self.sidecars.get(&image.with_extension(""))
    }

    /// Sidecars that belong to no image in `images` (orphans).
    pub fn orphan_sidecars<'a>(&'a self, images: &[&Path]) -> Vec<&'a Found> {
        let used: std::collections::HashSet<PathBuf> = images.iter().map(|p| p.with_extension("")).collect();
        let mut orphans: Vec<&Found> =
            self.sidecars.iter().filter(|(k, _)| !used.contains(*k)).map(|(_, f)| f).collect();
        orphans.sort_by(|a, b| a.rel.cmp(&b.rel));
        orphans
    }

    /// Metadata lines that name no file of `files` (a typo, a moved image),
    /// in file and line order.
    pub fn orphan_metadata_lines(&self, files: &[&Path]) -> Vec<&MetadataLine> {
        let used: std::collections::HashSet<PathBuf> = files.iter().map(|p| normalise(p)).collect();
        let mut orphans: Vec<&MetadataLine> =
            self.metadata.iter().filter(|(k, _)| !used.contains(*k)).map(|(_, m)| m).collect();
        orphans.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        orphans
    }

    /// The caption of the image at `path`, trigger applied.
    pub fn caption_for(&self, path: &Path) -> Caption {
        let mut issue = None;
        if let Some(found) = self.sidecar_path_for(path) {
            match std::fs::read(&found.path).map(String::from_utf8) {
                Ok(Ok(text)) => match clean(&text) {
                    Some(text) => return self.finish(text, Source::Sidecar, None),
                    None => issue = Some(Issue::Empty { file: found.rel.clone() }),
                },
                Ok(Err(_)) => issue = Some(Issue::NotUtf8 { file: found.rel.clone() }),
                Err(e) => issue = Some(Issue::Unreadable { file: found.rel.clone(), error: e.to_string() }),
            }
        }
        if let Some(entry) = self.metadata.get(&normalise(path)) {
            match clean(&entry.text) {
                Some(text) => return self.finish(text, Source::Metadata, issue),
                None => issue = issue.or(Some(Issue::Empty { file: entry.file.clone() })),
            }
        }
        let issue = issue.or(Some(Issue::Missing));
        match (&self.template, &self.trigger) {
            (Some(template), _) => self.finish(template.clone(), Source::Template, issue),
            (None, Some(trigger)) => Caption { text: trigger.clone(), source: Source::Trigger, issue },
            (None, None) => Caption { text: String::new(), source: Source::None, issue },
        }
    }

    fn finish(&self, text: String, source: Source, issue: Option<Issue>) -> Caption {
        Caption { text: apply_trigger(&text, self.trigger.as_deref()), source, issue }
    }
}

/// `[trigger]` replaced by the trigger, or the trigger prepended
/// (`"brandx, a red car"`) when the caption does not hold it as a word.
pub fn apply_trigger(caption: &str, trigger: Option<&str>) -> String {
    let Some(trigger) = trigger.filter(|t| !t.is_empty()) else {
        return caption.replace("[trigger]", "").split_whitespace().collect::<Vec<_>>().join(" ");
    };
    if caption.contains("[trigger]") {
        return caption.replace("[trigger]", trigger);
    }
    if caption.is_empty() {
        return trigger.to_string();
    }
    let holds = caption
        .split(|c: char| !c.is_alphanumeric() && c != '_' && c != '-')
        .any(|word| word.eq_ignore_ascii_case(trigger));
    if holds {
        caption.to_string()
    } else {
        format!("{trigger}, {caption}")
    }
}

/// The lines of a file's bytes, ended by LF, CRLF or a lone CR (old Mac
/// editors), so one line ending style never fuses the whole file into one line.
fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest.iter().position(|&b| b == b'\n' || b == b'\r').unwrap_or(rest.len());
        let line = &rest[..end];
        let skip = if rest[end..].starts_with(b"\r\n") { 2 } else { 1.min(rest.len() - end) };
        rest = &rest[end + skip..];
        Some(line)
    })
}

/// One line: BOM dropped, line breaks to spaces, outer whitespace trimmed;
/// `None` when nothing is left.
fn clean(text: &str) -> Option<String> {
    let text = text.trim_start_matches('\u{feff}');
    let joined = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
    let joined = joined.trim().to_string();
    (!joined.is_empty()).then_some(joined)
}

/// `a/./b/../c` -> `a/c`, without touching the file system.
fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(dir: &Path, rel: &str) -> Found {
        Found { path: dir.join(rel), rel: rel.into() }
    }

    #[test]
    fn trigger_replaces_or_is_prepended() {
        assert_eq!(apply_trigger("a photo of [trigger] shoes", Some("brandx")), "a photo of brandx shoes");
        assert_eq!(apply_trigger("red shoes", Some("brandx")), "brandx, red shoes");
        assert_eq!(apply_trigger("BrandX red shoes", Some("brandx")), "BrandX red shoes");
        assert_eq!(apply_trigger("a [trigger] photo", None), "a photo");
        assert_eq!(apply_trigger("", Some("brandx")), "brandx");
    }

    #[test]
    fn sources_in_order_with_issues() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let d = tmp.path();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("a.txt"), "\u{feff}red shoes\nwith laces\n").unwrap();
        std::fs::write(d.join("b.txt"), "  \n").unwrap();
        std::fs::write(d.join("c.txt"), [0xff, 0xfe, 0x41]).unwrap();
        std::fs::write(
            d.join("metadata.jsonl"),
            "{\"file_name\": \"b.png\", \"text\": \"blue bag\"}\n{\"file_name\": \"sub/e.png\", \"text\": \"green hat\"}\nnot json\n",
        )
        .unwrap();
        let sidecars = [found(d, "a.txt"), found(d, "b.txt"), found(d, "c.txt")];
        let caps = Captions::new(&sidecars, &[found(d, "metadata.jsonl")], Some("a photo of [trigger]"), Some("bx"));
        let a = caps.caption_for(&d.join("a.jpg"));
        assert_eq!((a.text.as_str(), a.source, a.issue), ("bx, red shoes with laces", Source::Sidecar, None));
        let b = caps.caption_for(&d.join("b.png"));
        assert_eq!((b.text.as_str(), b.source), ("bx, blue bag", Source::Metadata));
        assert_eq!(b.issue, Some(Issue::Empty { file: "b.txt".into() }));
        let c = caps.caption_for(&d.join("c.webp"));
        assert_eq!((c.text.as_str(), c.source), ("a photo of bx", Source::Template));
        assert_eq!(c.issue, Some(Issue::NotUtf8 { file: "c.txt".into() }));
        let e = caps.caption_for(&d.join("sub/e.png"));
        assert_eq!(e.text, "bx, green hat");
        let f = caps.caption_for(&d.join("f.png"));
        assert_eq!((f.source, f.issue), (Source::Template, Some(Issue::Missing)));
        assert_eq!(caps.problems.len(), 1);
        assert!(caps.problems[0].message.contains("line 3"));
    }

    #[test]
    fn a_bad_metadata_line_costs_only_itself() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let d = tmp.path();
        let mut bytes = "\u{feff}{\"file_name\": \"a.png\", \"text\": \"red shoes\"}\r\n".as_bytes().to_vec();
        bytes.extend_from_slice(b"{\"file_name\": \"b.png\", \"text\": \"caf\xe9 table\"}\n");
        bytes.extend_from_slice(b"{\"file_name\": \"c.png\"}\n{\"file_name\": \"d.png\", \"text\": \"blue bag\"}\n");
        std::fs::write(d.join("metadata.jsonl"), &bytes).unwrap();
        let caps = Captions::new(&[], &[found(d, "metadata.jsonl")], None, None);
        assert_eq!(caps.caption_for(&d.join("a.png")).text, "red shoes");
        assert_eq!(caps.caption_for(&d.join("d.png")).text, "blue bag");
        assert_eq!(caps.caption_for(&d.join("b.png")).issue, Some(Issue::Missing));
        let messages: Vec<_> = caps.problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(messages[0].starts_with("line 2 is not UTF-8"), "{messages:?}");
        assert!(messages[1].starts_with("line 3:"), "{messages:?}");
        let orphans: Vec<_> = caps.orphan_metadata_lines(&[&d.join("a.png")]).iter().map(|m| m.line).collect();
        assert_eq!(orphans, [4], "d.png is not among the files");

        let split: Vec<_> = lines(b"a\r\nb\rc\n\nd").collect();
        assert_eq!(split, [&b"a"[..], b"b", b"c", b"", b"d"]);

        std::fs::write(d.join("metadata.jsonl"), [0xFF, 0xFE, b'{', 0]).unwrap();
        let caps = Captions::new(&[], &[found(d, "metadata.jsonl")], None, None);
        assert_eq!(caps.problems.len(), 1);
        assert!(caps.problems[0].message.contains("UTF-16"), "{:?}", caps.problems);
    }
}
