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
}
