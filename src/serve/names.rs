//! Adapter names as requests give them: plain names, never paths. A name
//! is only ever looked up in the listing of the adapter folders, so a
//! request cannot reach any other file.

/// Why `name` cannot name an adapter, as one sentence; `None` when it can.
pub fn refusal(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("an adapter name is empty; GET /v1/adapters lists the names".into());
    }
    if name.contains(['/', '\\']) || name == "." || name == ".." || name.starts_with('.') {
        return Some(format!(
            "adapter {name:?} looks like a path; adapters are chosen by name only (GET /v1/adapters lists them)"
        ));
    }
    if name.chars().any(char::is_control) || name.chars().count() > 200 {
        return Some(format!("adapter {name:?} is not a name; GET /v1/adapters lists the names"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_refused_and_plain_names_pass() {
        for bad in ["../x", "a/b", "..", ".hidden", "c:\\x", "", "a\nb"] {
            assert!(refusal(bad).is_some(), "{bad:?} should be refused");
        }
        for good in ["acme", "acme-2027", "tidewave v2", "brand_1.5"] {
            assert_eq!(refusal(good), None, "{good:?}");
        }
    }
}
