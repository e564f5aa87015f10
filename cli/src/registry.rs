//! The list `prefetch` reads: one URL a line, optionally followed by its SHA-256, as pooch
//! registries give them (`ct/0042.nii.gz 9f86d0...` or `... sha256:9f86d0...`).

use std::io::{self, BufRead};
use std::path::Path;

use anyhow::Context;

/// One line of the list.
#[derive(Debug, PartialEq, Eq)]
pub struct Wanted {
    pub url: String,
    /// The digest the download must have, lowercase hex.
    pub sha256: Option<String>,
}

/// The lines of `file` (`-` for stdin), without blank lines and `#` comments.
pub fn read(file: &Path) -> anyhow::Result<Vec<Wanted>> {
    let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(io::BufReader::new(io::stdin()))
    } else {
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        Box::new(io::BufReader::new(f))
    };
    let mut wanted = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", file.display()))?;
        let where_ = || format!("{}:{}", file.display(), n + 1);
        if let Some(item) = parse_line(&line).with_context(where_)? {
            wanted.push(item);
        }
    }
    Ok(wanted)
}

fn parse_line(line: &str) -> anyhow::Result<Option<Wanted>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut fields = line.split_whitespace();
    let url = fields.next().unwrap_or_default().to_owned();
    let sha256 = match fields.next() {
        None => None,
        Some(field) => {
            let hex = field
                .strip_prefix("sha256:")
                .unwrap_or(field)
                .to_ascii_lowercase();
            anyhow::ensure!(
                hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
                "{field:?} is not a SHA-256 (64 hex digits, optionally after sha256:)"
            );
            Some(hex)
        }
    };
    anyhow::ensure!(
        fields.next().is_none(),
        "a line is a URL and at most one SHA-256"
    );
    Ok(Some(Wanted { url, sha256 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_urls_with_an_optional_digest() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_line("  # a comment").unwrap(), None);
        assert_eq!(parse_line("").unwrap(), None);
        assert_eq!(
            parse_line("ct/1.nii.gz").unwrap(),
            Some(Wanted {
                url: "ct/1.nii.gz".into(),
                sha256: None
            })
        );
        for line in [
            format!("ct/1.nii.gz {hex}"),
            format!("ct/1.nii.gz\tsha256:{}", hex.to_uppercase()),
        ] {
            assert_eq!(
                parse_line(&line).unwrap().unwrap().sha256,
                Some(hex.clone())
            );
        }
        assert!(parse_line("ct/1.nii.gz md5:abc").is_err());
        assert!(parse_line(&format!("ct/1.nii.gz {hex} extra")).is_err());
    }
}
