//! A minimal Confluent Schema Registry on 127.0.0.1 for tests that only
//! need writer schemas by id: `GET /schemas/ids/{id}` answers
//! `{"schema": "..."}` for the ids it was given and `404` / `40403` for any
//! other. (tests/it/registry.rs has a richer one: auth, registration,
//! failures.) Runs on the caller's tokio runtime until it ends.

use axum::http::{StatusCode, Uri};
use tokio::net::TcpListener;

/// Serves `schemas` (id, schema text); returns the base URL.
pub async fn serve(schemas: Vec<(u32, String)>) -> String {
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let found = uri
            .path()
            .strip_prefix("/schemas/ids/")
            .and_then(|i| i.parse::<u32>().ok())
            .and_then(|id| schemas.iter().find(|(i, _)| *i == id))
            .map(|(_, text)| text.clone());
        async move {
            match found {
                Some(text) => (
                    StatusCode::OK,
                    serde_json::json!({ "schema": text }).to_string(),
                ),
                None => (
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"error_code": 40403, "message": "Schema not found"})
                        .to_string(),
                ),
            }
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}
