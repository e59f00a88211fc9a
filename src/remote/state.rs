//! The rollout state's commands on the lock host: the summary any controller reads to resume or
//! recover, and the word an operator leaves for a canary (promote or abort).

use super::{q, sh};

/// Replaces `file` atomically with the JSON on stdin, through a temporary file of its own in
/// the same directory (`mktemp`: two writers never share one), readable by the SSH user only.
pub fn write(state_dir: &str, file: &str) -> String {
    sh![
        "umask 077; mkdir -p -m 700 ",
        q(state_dir),
        " && t=$(mktemp ",
        q(&format!("{file}.XXXXXX")),
        ") && { cat > \"$t\" && mv -f \"$t\" ",
        q(file),
        " || { rm -f \"$t\"; exit 1; }; }",
    ]
    .into_string()
}

/// Appends the line on stdin to `file` and keeps only its newest `keep` lines, through a
/// temporary file renamed over it, so a reader never sees half of one. Blank lines are dropped
/// and a last line without its newline gets one, so no earlier line can swallow the new one.
pub fn append_bounded(state_dir: &str, file: &str, keep: usize) -> String {
    sh![
        "umask 077; mkdir -p -m 700 ",
        q(state_dir),
        " && t=$(mktemp ",
        q(&format!("{file}.XXXXXX")),
        ") && { { if [ -f ",
        q(file),
        " ]; then awk NF ",
        q(file),
        " | tail -n ",
        keep.saturating_sub(1),
        "; fi; cat; } > \"$t\" && mv -f \"$t\" ",
        q(file),
        " || { rm -f \"$t\"; exit 1; }; }",
    ]
    .into_string()
}

/// Prints `file`, or nothing when there is none.
pub fn read(file: &str) -> String {
    sh!["if [ -f ", q(file), " ]; then cat ", q(file), "; fi"].into_string()
}

/// Leaves `word` (`promote <id>` or `abort <id>`) in `file` for the running canary to find.
pub fn decide(state_dir: &str, file: &str, word: &str) -> String {
    sh![
        "umask 077; mkdir -p -m 700 ",
        q(state_dir),
        " && printf '%s\\n' ",
        q(word),
        " > ",
        q(file),
    ]
    .into_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_is_one_quoted_word_in_a_quoted_file() {
        assert_eq!(
            decide(
                "/etc/nginx/my dir",
                "/etc/nginx/my dir/shop.decision",
                "promote 0a1b"
            ),
            "umask 077; mkdir -p -m 700 '/etc/nginx/my dir' && printf '%s\\n' 'promote 0a1b' > '/etc/nginx/my dir/shop.decision'"
        );
        assert_eq!(read("/s/x y"), "if [ -f '/s/x y' ]; then cat '/s/x y'; fi");
    }

    #[test]
    fn the_history_keeps_the_newest_lines_with_the_one_appended() {
        assert_eq!(
            append_bounded("/s t", "/s t/shop.history.jsonl", 100),
            "umask 077; mkdir -p -m 700 '/s t' && t=$(mktemp '/s t/shop.history.jsonl.XXXXXX') && { { if [ -f '/s t/shop.history.jsonl' ]; then awk NF '/s t/shop.history.jsonl' | tail -n 99; fi; cat; } > \"$t\" && mv -f \"$t\" '/s t/shop.history.jsonl' || { rm -f \"$t\"; exit 1; }; }"
        );
    }

    /// Run by the machine's own `sh`: the file is cut to the newest lines, and a last line
    /// left without its newline cannot swallow the one appended.
    #[test]
    fn the_history_file_stays_bounded_when_run() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("st");
        let file = state.join("h.jsonl");
        let command = append_bounded(state.to_str().unwrap(), file.to_str().unwrap(), 3);
        for line in ["a\n", "b\n", "c\n", "d\n"] {
            let mut child = std::process::Command::new("sh")
                .args(["-c", &command])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(line.as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success());
        }
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "b\nc\nd\n");
        std::fs::write(&file, "b\n\nc").unwrap();
        let mut child = std::process::Command::new("sh")
            .args(["-c", &command])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"e\n").unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "b\nc\ne\n");
    }
}
