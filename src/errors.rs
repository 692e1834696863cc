//! The one-sentence rendering of errors that every layer may use; it
//! depends on nothing else in the crate, so anything can call it.

/// The error and its causes as one line, without repeating a cause the
/// message already contains.
pub fn one_sentence(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}
