//! Exclude patterns for `berth sync`, with `.dockerignore` semantics so CI
//! users need to learn nothing new: one pattern per line, `#` comments,
//! blank lines ignored, a leading `!` re-includes, a leading `/` is dropped,
//! patterns are cleaned (`a//b/./c` is `a/b/c`). Matching is against the
//! slash-separated path relative to the synced directory: `*` matches within
//! one path segment, `?` one character of it, `[...]` a character class
//! (`[!...]` / `[^...]` negated, ranges), `\` escapes, and `**` any number of
//! whole segments (at the end: at least one). A path is excluded when the
//! last pattern that matches it, or one of its parent directories, is not a
//! `!` pattern (moby's `MatchesOrParentMatches`).
//!
//! One deliberate difference: docker skips walking an excluded directory
//! unless a `!` pattern starts with its path, so `node_modules` with
//! `!**/keep` drops `node_modules/a/keep`; here a directory is only skipped
//! when no `!` pattern could match below it, so the matcher's answer holds
//! for every file.

use std::path::Path;

/// One parsed pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    /// Cleaned, slash-separated, without the `!`.
    text: String,
    segments: Vec<String>,
    exception: bool,
}

/// An ordered list of exclude patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Excludes {
    patterns: Vec<Pattern>,
}

/// A pattern that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("exclude pattern {pattern:?}: {reason}")]
pub struct PatternError {
    pub pattern: String,
    pub reason: &'static str,
}

/// `path` cleaned like Go's `path.Clean`, relative, without a leading `/`.
fn clean(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    out.join("/")
}

impl Excludes {
    /// Parses the text of an exclude file.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let mut ex = Self::default();
        for line in text.lines() {
            ex.add(line)?;
        }
        Ok(ex)
    }

    /// Adds one pattern line (comments and blank lines are ignored).
    pub fn add(&mut self, line: &str) -> Result<(), PatternError> {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return Ok(());
        }
        let (exception, raw) = match line.strip_prefix('!') {
            Some(rest) => (true, rest.trim()),
            None => (false, line),
        };
        let text = clean(raw);
        if text.is_empty() {
            // "/" or "." would exclude everything; docker refuses "!" alone.
            return Err(PatternError {
                pattern: line.to_owned(),
                reason: "matches the whole directory; nothing would be synced",
            });
        }
        let segments: Vec<String> = text.split('/').map(str::to_owned).collect();
        for s in &segments {
            check_segment(s).map_err(|reason| PatternError {
                pattern: line.to_owned(),
                reason,
            })?;
        }
        self.patterns.push(Pattern {
            text,
            segments,
            exception,
        });
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `rel` (slash-separated, relative) is excluded.
    pub fn excludes(&self, rel: &str) -> bool {
        let parts: Vec<&str> = rel.split('/').filter(|s| !s.is_empty()).collect();
        let mut matched = false;
        for p in &self.patterns {
            // An include only matters while unmatched, an exception only
            // once matched.
            if p.exception != matched {
                continue;
            }
            let hit = (1..=parts.len()).any(|n| match_segments(&p.segments, &parts[..n]));
            if hit {
                matched = !p.exception;
            }
        }
        matched
    }

    /// Whether the walk may skip the excluded directory `rel` entirely: no
    /// `!` pattern could re-include anything below it.
    pub fn can_skip_dir(&self, rel: &str) -> bool {
        let prefix = format!("{rel}/");
        !self.patterns.iter().any(|p| {
            p.exception
                && (p.text.starts_with(&prefix)
                    || p.text.contains(['*', '?', '[', '\\'])
                    || prefix.starts_with(&format!("{}/", p.text)))
        })
    }
}

/// Rejects malformed segments up front so matching never has to.
fn check_segment(seg: &str) -> Result<(), &'static str> {
    let b = seg.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => {
                if i + 1 >= b.len() {
                    return Err("ends with an escape `\\`");
                }
                i += 2;
            }
            b'[' => {
                i = class_end(b, i).ok_or("unclosed character class `[`")?;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// Index just past the `]` closing the class that opens at `b[open]`.
fn class_end(b: &[u8], open: usize) -> Option<usize> {
    let mut i = open + 1;
    if i < b.len() && (b[i] == b'!' || b[i] == b'^') {
        i += 1;
    }
    let mut first = true;
    while i < b.len() {
        match b[i] {
            b']' if !first => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
        first = false;
    }
    None
}

/// Whether pattern segments match path segments exactly.
fn match_segments(pat: &[String], path: &[&str]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            // A trailing `**` needs at least one segment (docker: `dir/**`
            // is `^dir/.*$`, which does not match `dir` itself).
            let min = usize::from(rest.is_empty());
            (min..=path.len()).any(|skip| match_segments(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((seg, path_rest)) => {
                match_one(first.as_bytes(), seg.as_bytes()) && match_segments(rest, path_rest)
            }
            None => false,
        },
    }
}

/// fnmatch of one segment: `*`, `?`, `[...]`, `\x`.
fn match_one(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    // Backtracking point of the last `*`: (pattern index after it, string index).
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        let step = if pi < p.len() {
            match p[pi] {
                b'*' => {
                    while pi < p.len() && p[pi] == b'*' {
                        pi += 1;
                    }
                    star = Some((pi, si));
                    continue;
                }
                b'?' => Some(pi + 1),
                b'[' => class_match(p, pi, s[si]),
                b'\\' if pi + 1 < p.len() => (p[pi + 1] == s[si]).then_some(pi + 2),
                c => (c == s[si]).then_some(pi + 1),
            }
        } else {
            None
        };
        match step {
            Some(next) => {
                pi = next;
                si += 1;
            }
            None => match star {
                Some((sp, ss)) => {
                    pi = sp;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// Matches `c` against the class at `p[open]`; the index after it on success.
fn class_match(p: &[u8], open: usize, c: u8) -> Option<usize> {
    let end = class_end(p, open)?;
    let mut i = open + 1;
    let negated = p[i] == b'!' || p[i] == b'^';
    if negated {
        i += 1;
    }
    let mut hit = false;
    let body_end = end - 1;
    while i < body_end {
        let mut lo = p[i];
        if lo == b'\\' && i + 1 < body_end {
            i += 1;
            lo = p[i];
        }
        i += 1;
        let mut hi = lo;
        if i + 1 < body_end && p[i] == b'-' {
            hi = p[i + 1];
            if hi == b'\\' && i + 2 < body_end {
                hi = p[i + 2];
                i += 1;
            }
            i += 2;
        }
        if lo <= c && c <= hi {
            hit = true;
        }
    }
    (hit != negated).then_some(end)
}

/// The exclude patterns for syncing `root`: `exclude_from` if given (it must
/// exist), else `root/.berthignore` if there is one; then `extra` patterns.
pub fn load(
    root: &Path,
    exclude_from: Option<&Path>,
    extra: &[String],
) -> Result<Excludes, String> {
    let file = match exclude_from {
        Some(f) => Some(f.to_owned()),
        None => {
            let f = root.join(super::IGNORE_FILE);
            f.is_file().then_some(f)
        }
    };
    let mut ex = match &file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| format!("reading the exclude file {}: {e}", f.display()))?;
            Excludes::parse(&text).map_err(|e| format!("{}: {e}", f.display()))?
        }
        None => Excludes::default(),
    };
    for p in extra {
        ex.add(p).map_err(|e| e.to_string())?;
    }
    Ok(ex)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(text: &str) -> Excludes {
        Excludes::parse(text).unwrap()
    }

    #[test]
    fn segments_match_like_fnmatch() {
        assert!(match_one(b"*.log", b"a.log"));
        assert!(!match_one(b"*.log", b"a.log.1"));
        assert!(match_one(b"a?c", b"abc"));
        assert!(!match_one(b"a?c", b"ac"));
        assert!(match_one(b"[a-c]x", b"bx"));
        assert!(!match_one(b"[a-c]x", b"dx"));
        assert!(match_one(b"[!a-c]x", b"dx"));
        assert!(match_one(b"[^a-c]x", b"dx"));
        assert!(match_one(b"\\*", b"*"));
        assert!(!match_one(b"\\*", b"a"));
        assert!(match_one(b"*a*b*", b"xxaYYbzz"));
        assert!(match_one(b"**", b""));
        assert!(match_one(b"[]]", b"]"));
    }

    #[test]
    fn paths_and_parents_match() {
        let e = ex("# comment\n\n target \n*.log\n/build/out\n");
        assert!(e.excludes("target"));
        assert!(e.excludes("target/debug/x"), "a parent matches");
        assert!(!e.excludes("src/target"), "patterns are anchored");
        assert!(e.excludes("a.log"));
        assert!(!e.excludes("dir/a.log"), "* stays within a segment");
        assert!(e.excludes("build/out/x"));
        assert!(!e.excludes("build/other"));
        assert!(!e.excludes("src/main.rs"));
    }

    #[test]
    fn double_star_spans_segments() {
        let e = ex("**/*.o\ncache/**\n");
        assert!(e.excludes("a.o"));
        assert!(e.excludes("x/y/z.o"));
        assert!(e.excludes("cache/a/b"));
        assert!(!e.excludes("cache"), "a trailing ** needs a segment");
        let e = ex("a/**/b\n");
        assert!(e.excludes("a/b"));
        assert!(e.excludes("a/x/y/b"));
        assert!(!e.excludes("a/x/y/c"));
    }

    #[test]
    fn exceptions_reinclude_in_order() {
        let e = ex("*.md\n!README.md\n");
        assert!(e.excludes("NOTES.md"));
        assert!(!e.excludes("README.md"));
        let e = ex("!README.md\n*.md\n");
        assert!(e.excludes("README.md"), "the last match wins");
        let e = ex("node_modules\n!node_modules/keep\n");
        assert!(e.excludes("node_modules/a"));
        assert!(!e.excludes("node_modules/keep"));
        assert!(!e.excludes("node_modules/keep/inner"));
    }

    #[test]
    fn dirs_are_skipped_only_when_no_exception_reaches_in() {
        let e = ex("node_modules\n");
        assert!(e.can_skip_dir("node_modules"));
        let e = ex("node_modules\n!node_modules/keep\n");
        assert!(!e.can_skip_dir("node_modules"));
        assert!(e.can_skip_dir("other"));
        let e = ex("node_modules\n!**/keep\n");
        assert!(!e.can_skip_dir("node_modules"));
        assert!(!e.excludes("node_modules/a/keep"));
    }

    #[test]
    fn patterns_are_cleaned() {
        let e = ex("/a//b/./c\nd/../e\n");
        assert!(e.excludes("a/b/c"));
        assert!(e.excludes("e"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["/", ".", "!", "[abc", "abc\\"] {
            assert!(Excludes::parse(bad).is_err(), "{bad:?}");
        }
    }
}
