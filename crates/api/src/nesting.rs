//! How deeply a YAML or JSON document nests, found by one linear pass over
//! its text before any parser sees it.
//!
//! The YAML parser (libyaml's design) does work proportional to the depth
//! for every token inside flow collections, so a document of nothing but
//! `[[[[...` costs the square of its length: a 100 KB one took ~38 s of
//! CPU. The pass here never under-counts the depth the parser would reach
//! (it may over-count in odd documents, e.g. a plain scalar that starts
//! with `[` and continues on the next line), so refusing a document deeper
//! than [`MAX_NESTING`] bounds the parser's work.

use crate::parse::Format;

/// The deepest nesting of collections a document may have. A Pod nests
/// about 8 deep (`spec.containers[].resources.limits` is 6).
pub const MAX_NESTING: usize = 64;

/// Where a document first goes deeper than `limit`: its line (from 1).
pub fn too_deep(text: &str, format: Format, limit: usize) -> Option<usize> {
    match format {
        Format::Json => json_too_deep(text, limit),
        Format::Yaml => YamlScan::new(limit).run(text),
    }
}

fn json_too_deep(text: &str, limit: usize) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1usize);
    let (mut in_string, mut escaped) = (false, false);
    for b in text.bytes() {
        if b == b'\n' {
            line += 1;
        }
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Some(line);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// A block collection open at a column.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Block {
    Sequence(usize),
    Mapping(usize),
}

impl Block {
    fn column(self) -> usize {
        match self {
            Block::Sequence(c) | Block::Mapping(c) => c,
        }
    }
}

/// A quoted scalar that has not ended yet.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quote {
    Single,
    Double,
}

/// A block scalar (`|`, `>`) being skipped: lines more indented than
/// `parent` (the first one setting `content`) are its text.
#[derive(Clone, Copy)]
struct BlockScalar {
    parent: Option<usize>,
    content: Option<usize>,
}

struct YamlScan {
    limit: usize,
    blocks: Vec<Block>,
    flow: usize,
    quote: Option<Quote>,
    block_scalar: Option<BlockScalar>,
    /// Whether a node may start at the next character.
    node_start: bool,
}

impl YamlScan {
    fn new(limit: usize) -> YamlScan {
        YamlScan {
            limit,
            blocks: Vec::new(),
            flow: 0,
            quote: None,
            block_scalar: None,
            node_start: true,
        }
    }

    fn depth(&self) -> usize {
        self.blocks.len() + self.flow
    }

    fn run(mut self, text: &str) -> Option<usize> {
        for (index, line) in text.split('\n').enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line).as_bytes();
            if self.line(line) {
                return Some(index + 1);
            }
        }
        None
    }

    /// Scans one line; true if the depth went over the limit.
    fn line(&mut self, line: &[u8]) -> bool {
        let indent = line.iter().take_while(|&&b| b == b' ').count();
        let blank = line[indent..].iter().all(|b| b.is_ascii_whitespace());
        if let Some(scalar) = &mut self.block_scalar {
            if blank {
                return false;
            }
            let inside = match scalar.content {
                Some(content) => indent >= content,
                None => scalar.parent.is_none_or(|p| indent > p),
            };
            if inside {
                scalar.content.get_or_insert(indent);
                return false;
            }
            self.block_scalar = None;
        }
        if self.quote.is_some() || self.flow > 0 {
            // Inside a quoted scalar or a flow collection: no block structure.
            return self.inline(line, 0, false);
        }
        if blank || line[indent] == b'#' {
            return false;
        }
        let mut at = indent;
        if indent == 0 && (line.starts_with(b"---") || line.starts_with(b"...")) {
            let end = line.get(3).is_none_or(|b| b.is_ascii_whitespace());
            if end {
                self.blocks.clear();
                at = 3;
                while line.get(at).is_some_and(|b| b.is_ascii_whitespace()) {
                    at += 1;
                }
                if at >= line.len() {
                    return false;
                }
            }
        }
        if line[at] == b'%' {
            return false;
        }
        // Close the collections this line is not inside. A sequence at the
        // column of a mapping's keys is that key's value.
        let is_entry = indicator(line, at, b'-');
        while let Some(&top) = self.blocks.last() {
            let keep = top.column() < at
                || (top.column() == at && matches!(top, Block::Mapping(_)) && is_entry);
            if keep {
                break;
            }
            self.blocks.pop();
        }
        // `- `, `? ` and `: ` indicators at the start, each a level.
        loop {
            if indicator(line, at, b'-') {
                self.blocks.push(Block::Sequence(at));
            } else if indicator(line, at, b'?') {
                self.blocks.push(Block::Mapping(at));
            } else if !indicator(line, at, b':') {
                break;
            }
            if self.depth() > self.limit {
                return true;
            }
            at += 1;
            while line.get(at) == Some(&b' ') {
                at += 1;
            }
        }
        self.inline(line, at, true)
    }

    /// Scans `line` from `start`: quoted scalars, flow collections,
    /// comments, and in block context (`block`) a mapping's `key:` and a
    /// block scalar's header. True if the depth went over the limit.
    ///
    /// A quote or a bracket opens something only where a node starts
    /// (the line's start, after `key: `, in a flow collection after `[`,
    /// `{`, `,` or `:`); elsewhere it is part of a plain scalar (`a: it's`).
    /// Inside a flow collection every bracket counts.
    fn inline(&mut self, line: &[u8], start: usize, block: bool) -> bool {
        let mut i = start;
        let mut after_space = true;
        if block {
            self.node_start = true;
        }
        let mut key_seen = false;
        while i < line.len() {
            let b = line[i];
            if let Some(quote) = self.quote {
                match (quote, b) {
                    (Quote::Single, b'\'') if line.get(i + 1) == Some(&b'\'') => i += 1,
                    (Quote::Single, b'\'') | (Quote::Double, b'"') => {
                        self.quote = None;
                        self.node_start = false;
                    }
                    (Quote::Double, b'\\') => i += 1,
                    _ => {}
                }
                i += 1;
                after_space = false;
                continue;
            }
            let flow = self.flow > 0;
            let node_start = self.node_start;
            let mut next_after_space = false;
            match b {
                b' ' | b'\t' => next_after_space = true,
                b'#' if after_space => return false,
                b'\'' if node_start => self.quote = Some(Quote::Single),
                b'"' if node_start => self.quote = Some(Quote::Double),
                b'[' | b'{' if flow || node_start => {
                    self.flow += 1;
                    if self.depth() > self.limit {
                        return true;
                    }
                    self.node_start = true;
                }
                b']' | b'}' if flow => {
                    self.flow -= 1;
                    self.node_start = false;
                }
                b',' | b'?' if flow => self.node_start = true,
                b'&' | b'!' if node_start => {
                    // An anchor or a tag: the node follows it.
                    while i < line.len() && !line[i].is_ascii_whitespace() {
                        i += 1;
                    }
                    continue;
                }
                b'|' | b'>' if block && !flow && node_start => {
                    self.block_scalar = Some(BlockScalar {
                        parent: self.blocks.last().map(|b| b.column()),
                        content: None,
                    });
                    return false;
                }
                b':' if flow || line.get(i + 1).is_none_or(|n| n.is_ascii_whitespace()) => {
                    if block && !flow && !key_seen {
                        key_seen = true;
                        self.blocks.push(Block::Mapping(key_column(line, start)));
                        if self.depth() > self.limit {
                            return true;
                        }
                    }
                    self.node_start = true;
                }
                _ => self.node_start = false,
            }
            after_space = next_after_space;
            i += 1;
        }
        false
    }
}

/// Whether `line[at]` is the indicator `c` followed by a space or the end.
fn indicator(line: &[u8], at: usize, c: u8) -> bool {
    line.get(at) == Some(&c) && line.get(at + 1).is_none_or(|b| b.is_ascii_whitespace())
}

/// The column of a mapping key that starts at or after `start`.
fn key_column(line: &[u8], start: usize) -> usize {
    start
        + line[start..]
            .iter()
            .take_while(|b| b.is_ascii_whitespace())
            .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_of(text: &str) -> usize {
        (1..200)
            .find(|&limit| too_deep(text, Format::Yaml, limit).is_none())
            .unwrap()
    }

    #[test]
    fn yaml_depths_are_counted_as_a_parser_nests() {
        assert_eq!(depth_of("a: 1\n"), 1);
        assert_eq!(depth_of("a:\n  b:\n    c: 1\n"), 3);
        // A sequence at its key's column is inside that key's mapping.
        assert_eq!(depth_of("a:\n- b: 1\n  c: [1, {d: 2}]\ne: 3\n"), 5);
        assert_eq!(depth_of("- - - x\n"), 3);
        assert_eq!(depth_of("[[[1]], [2]]\n"), 3);
        assert_eq!(depth_of("a: {b: [\n  1,\n  [2]]}\n"), 4);
        // Text inside quotes, comments and block scalars is not structure.
        assert_eq!(depth_of("a: '[[[['\nb: \"{{{\\\"\"\n"), 1);
        assert_eq!(depth_of("a: 1 # [[[[\n"), 1);
        assert_eq!(depth_of("a: |\n  [[[[\n  {{{{\nb: 1\n"), 1);
        assert_eq!(depth_of("a: it's\nb: [[x]]\n"), 3);
        // A block scalar ends where its indentation does.
        assert_eq!(depth_of("- a: |\n    x\n  b: [[[x]]]\n"), 5);
    }

    #[test]
    fn deep_documents_are_found_in_linear_time() {
        let flow = "[".repeat(100_000);
        let started = std::time::Instant::now();
        assert_eq!(too_deep(&flow, Format::Yaml, MAX_NESTING), Some(1));
        assert_eq!(too_deep(&flow, Format::Json, MAX_NESTING), Some(1));
        let block: String = (0..100).map(|i| format!("{}a:\n", " ".repeat(i))).collect();
        assert_eq!(too_deep(&block, Format::Yaml, MAX_NESTING), Some(65));
        let entries = "- ".repeat(50_000);
        assert_eq!(too_deep(&entries, Format::Yaml, MAX_NESTING), Some(1));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(
            too_deep(r#"{"a": "[[[[", "b": [[1]]}"#, Format::Json, 2),
            Some(1)
        );
        assert_eq!(
            too_deep(r#"{"a": "[[[[\"", "b": [1]}"#, Format::Json, 2),
            None
        );
    }
}
