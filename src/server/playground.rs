//! The live-query playground (`GET /`) and the JavaScript client it is built on
//! (`GET /client/{file}`, the ES modules of `clients/js/src`): static files compiled into the
//! binary, so a fresh `livegrid serve` shows what it does in a browser with nothing else
//! installed.

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The playground's files.
const PLAYGROUND: &[(&str, &str)] = &[
    ("index.html", include_str!("playground/index.html")),
    ("playground.js", include_str!("playground/playground.js")),
    ("playground.css", include_str!("playground/playground.css")),
];

/// The client's modules.
const CLIENT: &[(&str, &str)] = &[
    ("index.js", include_str!("../../clients/js/src/index.js")),
    ("client.js", include_str!("../../clients/js/src/client.js")),
    ("live-result.js", include_str!("../../clients/js/src/live-result.js")),
    ("sketch.js", include_str!("../../clients/js/src/sketch.js")),
    ("index.d.ts", include_str!("../../clients/js/src/index.d.ts")),
];

fn serve(files: &[(&str, &'static str)], name: &str) -> Response {
    let Some((_, body)) = files.iter().find(|(file, _)| *file == name) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let kind = match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        _ => "text/plain; charset=utf-8",
    };
    // Revalidated on every load: a new binary never leaves an old page in a browser.
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")], *body).into_response()
}

/// `GET /`: the playground page.
pub async fn page() -> Response {
    serve(PLAYGROUND, "index.html")
}

/// `GET /playground/{file}`.
pub async fn playground_file(Path(name): Path<String>) -> Response {
    serve(PLAYGROUND, &name)
}

/// `GET /client/{file}`.
pub async fn client_file(Path(name): Path<String>) -> Response {
    serve(CLIENT, &name)
}
