//! `GET /api/entries`: every entry, or (for the dashboard's table, which must stay usable at
//! tens of thousands of entries) one page of those whose URL contains a search text, sorted
//! by a column. `X-Total-Count` says how many entries match before paging.
//!
//! | parameter | what |
//! |---|---|
//! | `q` | keeps entries whose URL contains it, ignoring ASCII case |
//! | `sort` | `url`, `size`, `fetched_at_ms`, `expires_at_ms`, `last_access_ms` or `hits` (ties by URL); the cache's own order without it |
//! | `order` | `asc` (the default) or `desc` |
//! | `offset`, `limit` | the page: skip `offset` entries, then at most `limit` (all without it) |

use std::cmp::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Json, Response};
use serde::Deserialize;

use super::{AppState, QueryArgs};
use crate::EntryInfo;

/// The header that says how many entries match the search, whatever the page.
const TOTAL_COUNT: HeaderName = HeaderName::from_static("x-total-count");

/// A column to sort by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Column {
    Url,
    Size,
    FetchedAtMs,
    ExpiresAtMs,
    LastAccessMs,
    Hits,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Order {
    #[default]
    Asc,
    Desc,
}

/// The query of `GET /api/entries`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EntryQuery {
    q: Option<String>,
    sort: Option<Column>,
    #[serde(default)]
    order: Order,
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

impl Column {
    /// By this column in `order`, ties by URL (ascending either way).
    fn compare(self, order: Order, a: &EntryInfo, b: &EntryInfo) -> Ordering {
        let by = match self {
            Column::Url => a.url.cmp(&b.url),
            Column::Size => a.size.cmp(&b.size),
            Column::FetchedAtMs => a.fetched_at_ms.cmp(&b.fetched_at_ms),
            Column::ExpiresAtMs => a.expires_at_ms.cmp(&b.expires_at_ms),
            Column::LastAccessMs => a.last_access_ms.cmp(&b.last_access_ms),
            Column::Hits => a.hits.cmp(&b.hits),
        };
        match order {
            Order::Asc => by,
            Order::Desc => by.reverse(),
        }
        .then_with(|| a.url.cmp(&b.url))
    }
}

/// The entries `query` asks for, and how many matched its search before paging.
fn select(mut entries: Vec<EntryInfo>, query: &EntryQuery) -> (usize, Vec<EntryInfo>) {
    if let Some(text) = query.q.as_deref().filter(|q| !q.is_empty()) {
        let text = text.to_ascii_lowercase();
        entries.retain(|e| e.url.to_ascii_lowercase().contains(&text));
    }
    let total = entries.len();
    if let Some(column) = query.sort {
        entries.sort_unstable_by(|a, b| column.compare(query.order, a, b));
    }
    let page = entries
        .into_iter()
        .skip(query.offset)
        .take(query.limit.unwrap_or(usize::MAX))
        .collect();
    (total, page)
}

/// `GET /api/entries[?q=&sort=&order=&offset=&limit=]`.
pub(super) async fn api_entries(
    State(st): State<Arc<AppState>>,
    QueryArgs(query): QueryArgs<EntryQuery>,
) -> Response {
    let (total, page) = select(st.cache.admin().entries(), &query);
    let mut response = Json(page).into_response();
    response
        .headers_mut()
        .insert(TOTAL_COUNT, HeaderValue::from(total));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(url: &str, size: u64, hits: u64) -> EntryInfo {
        EntryInfo {
            url: url.to_owned(),
            path: "/x".into(),
            size,
            sha256: String::new(),
            fetched_at_ms: 1000 - size,
            expires_at_ms: 0,
            last_access_ms: 0,
            hits,
            pinned: false,
        }
    }

    fn urls(entries: &[EntryInfo]) -> Vec<&str> {
        entries.iter().map(|e| e.url.as_str()).collect()
    }

    /// The query string as axum's `Query` reads it.
    fn query(text: &str) -> EntryQuery {
        let uri: axum::http::Uri = format!("/api/entries?{text}").parse().unwrap();
        axum::extract::Query::<EntryQuery>::try_from_uri(&uri)
            .unwrap()
            .0
    }

    #[test]
    fn search_sort_and_page() {
        let all = vec![
            entry("http://h/CT/b.nii.gz", 30, 1),
            entry("http://h/ct/a.nii.gz", 10, 5),
            entry("http://h/mr/c.nii.gz", 20, 5),
            entry("http://h/ct/d.nii.gz", 20, 0),
        ];
        let (total, page) = select(all.clone(), &EntryQuery::default());
        assert_eq!(
            (total, page.len()),
            (4, 4),
            "no query: everything, as it was"
        );
        assert_eq!(urls(&page)[0], "http://h/CT/b.nii.gz");

        let (total, page) = select(all.clone(), &query("q=/ct/&sort=size"));
        assert_eq!(total, 3, "the search ignores case");
        assert_eq!(
            urls(&page),
            [
                "http://h/ct/a.nii.gz",
                "http://h/ct/d.nii.gz",
                "http://h/CT/b.nii.gz"
            ]
        );
        let (_, page) = select(all.clone(), &query("sort=hits&order=desc"));
        assert_eq!(
            urls(&page),
            [
                "http://h/ct/a.nii.gz",
                "http://h/mr/c.nii.gz",
                "http://h/CT/b.nii.gz",
                "http://h/ct/d.nii.gz"
            ],
            "ties by URL, ascending either way"
        );
        let (_, page) = select(all.clone(), &query("sort=fetched_at_ms&order=desc"));
        assert_eq!(urls(&page)[0], "http://h/ct/a.nii.gz", "the newest first");
        let (_, page) = select(all.clone(), &query("sort=url&order=desc&limit=1"));
        assert_eq!(urls(&page), ["http://h/mr/c.nii.gz"]);
        let (total, page) = select(all.clone(), &query("sort=url&offset=1&limit=2"));
        assert_eq!(total, 4, "the count is before paging");
        assert_eq!(
            urls(&page),
            ["http://h/ct/a.nii.gz", "http://h/ct/d.nii.gz"]
        );
        let (total, page) = select(all, &query("q=nothing&offset=10"));
        assert_eq!((total, page.len()), (0, 0));
    }

    #[test]
    fn a_page_of_ten_thousand_entries_is_chosen_and_encoded_quickly() {
        let all: Vec<EntryInfo> = (0..10_000u64)
            .map(|i| {
                let url = format!("http://images.example.org/studies/ct_{i:05}/volume.nii.gz");
                entry(&url, (i * 7919) % 1000, i % 7)
            })
            .collect();
        let started = std::time::Instant::now();
        let (total, page) = select(
            all.clone(),
            &query("q=CT_0&sort=size&order=desc&offset=50&limit=50"),
        );
        let json = serde_json::to_vec(&page).unwrap();
        let took = started.elapsed();
        assert_eq!((total, page.len()), (10_000, 50));
        assert!(json.len() < 20_000, "a page is small: {} bytes", json.len());
        // A few milliseconds even unoptimised; the bound leaves room for a loaded machine.
        assert!(took < std::time::Duration::from_secs(1), "{took:?}");
        assert!(page.windows(2).all(|w| w[0].size >= w[1].size));
    }

    #[test]
    fn unknown_columns_and_parameters_are_refused() {
        for text in ["sort=path", "order=up", "offset=-1", "colour=1"] {
            let uri: axum::http::Uri = format!("/api/entries?{text}").parse().unwrap();
            assert!(
                axum::extract::Query::<EntryQuery>::try_from_uri(&uri).is_err(),
                "{text}"
            );
        }
    }
}
