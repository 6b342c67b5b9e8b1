//! Keywords for search: what an item is found by, and whether it matches a query.
//!
//! Names and tags are lower-cased and split on anything that is not a letter or
//! digit; words shorter than two characters are dropped. A whole tag is a keyword
//! too, so "sci-fi" finds items tagged "sci-fi" as well as "sci" and "fi" words.

use std::collections::BTreeSet;

use crate::Manifest;

/// Most keywords announced per item; each one is a DHT provider record.
pub const MAX_KEYWORDS: usize = 16;

fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() >= 2)
        .map(str::to_lowercase)
}

/// The keywords a query is made of, in the order given.
pub fn query_keywords(query: &str) -> Vec<String> {
    let mut seen = BTreeSet::new();
    words(query).filter(|w| seen.insert(w.clone())).collect()
}

/// The keywords an item is announced under.
pub fn manifest_keywords(m: &Manifest) -> Vec<String> {
    let mut out = BTreeSet::new();
    for tag in &m.tags {
        let t = tag.trim().to_lowercase();
        if t.chars().count() >= 2 {
            out.insert(t);
        }
        out.extend(words(tag));
    }
    out.extend(words(&m.name));
    out.into_iter().take(MAX_KEYWORDS).collect()
}

/// Every word an item is matched by: the words of its name and tags, and
/// each whole tag (what [`matches`] compares a query with, and what a
/// store's search index holds).
pub fn item_words(m: &Manifest) -> BTreeSet<String> {
    let mut have: BTreeSet<String> = words(&m.name).collect();
    for tag in &m.tags {
        have.insert(tag.trim().to_lowercase());
        have.extend(words(tag));
    }
    have
}

/// Whether an item matches every keyword of a query (prefix match on words, so
/// "sint" finds "Sintel").
pub fn matches(m: &Manifest, query: &[String]) -> bool {
    let have = item_words(m);
    query
        .iter()
        .all(|q| have.iter().any(|w| w.starts_with(q.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, tags: &[&str]) -> Manifest {
        Manifest {
            name: name.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn keywords_come_from_name_words_and_tags() {
        let k = manifest_keywords(&m("Sintel (2010) Trailer.mp4", &["Sci-Fi", "open movie"]));
        for w in [
            "sintel",
            "2010",
            "trailer",
            "mp4",
            "sci-fi",
            "sci",
            "fi",
            "open movie",
            "movie",
        ] {
            assert!(k.contains(&w.to_string()), "{w} missing from {k:?}");
        }
        assert!(!k.iter().any(|w| w.chars().count() < 2));
        assert_eq!(
            query_keywords("Sintel sintel  TRAILER!"),
            vec!["sintel", "trailer"]
        );
    }

    #[test]
    fn a_match_needs_every_query_word() {
        let item = m("Sintel Trailer.mp4", &["blender"]);
        assert!(matches(&item, &query_keywords("sintel blender")));
        assert!(matches(&item, &query_keywords("sint")));
        assert!(!matches(&item, &query_keywords("sintel bunny")));
    }
}
