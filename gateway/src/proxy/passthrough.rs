//! Other `/v1/*` requests (files, fine-tuning, embeddings, …): forwarded as they are, not captured.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};

use super::ProxyState;
use crate::error::Error;
use crate::upstream::strip_hop_by_hop;

pub async fn forward(State(state): State<Arc<ProxyState>>, request: Request) -> Response {
    match send(&state, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn send(state: &ProxyState, request: Request) -> Result<Response, Error> {
    let Some(upstream) = &state.passthrough else {
        return Err(Error::UnknownPath {
            method: request.method().to_string(),
            path: request.uri().path().to_string(),
        });
    };
    let (parts, body) = request.into_parts();
    check_path(parts.uri.path())?;
    if let Some(own) = own_route_in_another_case(parts.uri.path()) {
        return Err(Error::invalid(
            format!("The request path is Forge's own `{own}` in another case; send it as `{own}`."),
            None,
        ));
    }
    if !state.passthrough_account_apis && is_account_api(parts.uri.path()) {
        return Err(Error::AccountApi(format!(
            "{} {}",
            parts.method,
            parts.uri.path()
        )));
    }
    state.body.check_declared(&parts.headers)?;
    // Bounded by the body limit, so holding it whole costs at most that much per request.
    let bytes = state.body.read(body).await?;
    if !state.passthrough_account_apis
        && let Some(field) = reads_stored_state(parts.uri.path(), &bytes)?
    {
        return Err(Error::AccountApi(format!(
            "{} {} with {field}",
            parts.method,
            parts.uri.path()
        )));
    }

    // The route is matched on `/v1/…`; the upstream's base URL already ends in its own `/v1`.
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let suffix = path_and_query.strip_prefix("/v1").unwrap_or(path_and_query);
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    headers.remove(header::ACCEPT_ENCODING);
    strip_client_routing(&mut headers);
    // The length of what is sent, which the body limit may have checked against a declared one.
    // A bodyless POST keeps its `Content-Length: 0`: strict servers answer 411 without one.
    let sends_content =
        !bytes.is_empty() || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
    if sends_content {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    } else {
        headers.remove(header::CONTENT_LENGTH);
    }
    let response = upstream.send(parts.method, suffix, headers, bytes).await?;
    // A redirect passed on would have the client send its content (a prompt, a document)
    // wherever it points, with the SDKs that follow a 307 or 308: as for chat, it is an error.
    // One for a request without content (a download sent to storage, say) is passed on.
    let status = response.status();
    if sends_content && status.is_redirection() && status != http::StatusCode::NOT_MODIFIED {
        return Err(Error::UpstreamRedirect);
    }
    Ok(response.map(Body::new))
}

/// Headers a client sends that are no business of the upstream, or that some servers route
/// by: the body is read whole already (`Expect`); what a client says of its own address or of
/// the path it meant is its word alone, and a framework that honours `X-Original-URL` or a
/// method override would serve another API than the one the account-API check passed; the
/// sticky key is for Forge's router.
fn strip_client_routing(headers: &mut http::HeaderMap) {
    const NAMES: [&str; 16] = [
        "expect",
        "forwarded",
        "x-real-ip",
        "true-client-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "cf-connecting-ip",
        "x-original-url",
        "x-original-uri",
        "x-rewrite-url",
        "x-original-host",
        "x-host",
        "x-original-method",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ];
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            NAMES.contains(&name)
                || name.starts_with("x-forwarded-")
                || name.starts_with("x-envoy-")
                || name == super::chat::STICKY_HEADER
        })
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// Refuses paths a server on the way may read differently from the router: dot segments (in
/// any spelling), empty segments, encoded slashes, `;` parameters, and percent-encoded letters,
/// digits or `-._~`, which no client needs to encode. The upstream request carries Forge's key,
/// so `/v1/../admin` must not reach another path of the upstream's host; and
/// `/v1/chat/completions/`, `/v1//chat/completions` or `/v1/chat/%63ompletions` (which a server
/// that decodes paths serves as chat) must not slip past routing and capture as a passthrough.
fn check_path(path: &str) -> Result<(), Error> {
    let refused = path.split('/').skip(1).any(|segment| {
        let lower = segment.to_ascii_lowercase();
        let dots = lower.replace("%2e", ".");
        segment.is_empty()
            || dots == "."
            || dots == ".."
            || lower.contains("%2f")
            || lower.contains("%5c")
            || segment.contains(['\\', ';'])
            || encodes_unreserved(segment)
    });
    if refused {
        return Err(Error::invalid(
            "The request path is not allowed: empty or dot segments, encoded slashes, `;`, and percent-encoded letters, digits or `-._~` are refused.",
            None,
        ));
    }
    Ok(())
}

/// The APIs that read or change what the account behind the upstream key holds: the
/// distiller's uploaded datasets (every client's traces) and jobs among it, and vLLM's adapter
/// loading, which would let a client unload a canary's student or swap its weights.
/// (`/v1/models` is Forge's own: it lists the aliases, and never reaches the passthrough.)
const ACCOUNT_APIS: [&str; 19] = [
    "files",
    "uploads",
    "fine_tuning",
    // Together's fine-tuning jobs, their weights' download, and dedicated endpoints (billed
    // while they run).
    "fine-tunes",
    "finetune",
    "endpoints",
    "batches",
    "vector_stores",
    "assistants",
    "threads",
    "organization",
    "evals",
    "containers",
    "conversations",
    "videos",
    // Sessions minted here (ephemeral client secrets) run against the provider directly, outside
    // Forge's keys, limits and capture.
    "realtime",
    "chatkit",
    "load_lora_adapter",
    "unload_lora_adapter",
];

/// The Responses API's computations: they pass, unless [`reads_stored_state`] says otherwise.
const RESPONSE_COMPUTATIONS: [&str; 3] =
    ["responses", "responses/input_tokens", "responses/compact"];

/// The part of a passthrough path after `/v1/`, in lower case: the API it names is compared so,
/// since some upstreams' routers ignore case (ASP.NET's, as Azure's may; Express's by
/// default), and `/v1/Files` must not slip past what `/v1/files` may not do.
fn api_path(path: &str) -> String {
    path.strip_prefix("/v1/").unwrap_or("").to_ascii_lowercase()
}

/// Forge's own `/v1` route that `path` names in another case, if any: such a request would
/// reach the upstream past routing and capture (a chat completion), or list the account's own
/// models.
fn own_route_in_another_case(path: &str) -> Option<&'static str> {
    let rest = path.strip_prefix("/v1/").unwrap_or("");
    let first = rest.split('/').next().unwrap_or("");
    // The route's own part of the path, as sent; what follows it (an id) keeps its case.
    let (own, named) = if rest.eq_ignore_ascii_case("chat/completions") {
        ("/v1/chat/completions", rest)
    } else if first.eq_ignore_ascii_case("feedback") {
        ("/v1/feedback", first)
    } else if first.eq_ignore_ascii_case("models") {
        ("/v1/models", first)
    } else {
        return None;
    };
    (named != &own["/v1/".len()..]).then_some(own)
}

/// Whether a passthrough request acts on the account rather than asking for a computation.
/// Stored chat completions and responses, by id, are the account's too: what it kept of every
/// client's exchanges. (`POST /v1/chat/completions` is routed before the passthrough.)
fn is_account_api(path: &str) -> bool {
    let rest = api_path(path);
    let first = rest.split('/').next().unwrap_or("");
    ACCOUNT_APIS.contains(&first)
        || rest.starts_with("chat/completions/")
        || (first == "responses" && !RESPONSE_COMPUTATIONS.contains(&rest.as_str()))
}

/// The field by which a Responses API computation would build on state the account stored:
/// another client's, given its id. At the top level, `previous_response_id` and
/// `conversation`; in `input`, `tools` and `prompt`, what [`super::stored::responses_reference`] finds (a stored
/// item, a file, a vector store, a container). The body is read strictly (a JSON object, no key
/// twice, no byte order mark), since the upstream's parser might find a field this one missed.
fn reads_stored_state(path: &str, body: &[u8]) -> Result<Option<&'static str>, Error> {
    if !RESPONSE_COMPUTATIONS.contains(&api_path(path).as_str()) {
        return Ok(None);
    }
    let entries = super::request::top_level(body)?;
    for (key, value) in &entries {
        let text = value.get().trim();
        match key.as_str() {
            "previous_response_id" if text != "null" => return Ok(Some("previous_response_id")),
            "conversation" if text != "null" => return Ok(Some("conversation")),
            field @ ("input" | "tools" | "prompt") => {
                let field = match field {
                    "input" => "input",
                    "tools" => "tools",
                    _ => "prompt",
                };
                // Keys spelt with escapes (`file\u005fid`) are decoded there as upstream.
                let found = super::stored::responses_reference(field, value)?;
                if found.is_some() {
                    return Ok(found);
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Whether `segment` percent-encodes a character that never needs it (RFC 3986's unreserved).
fn encodes_unreserved(segment: &str) -> bool {
    segment.split('%').skip(1).any(|after| {
        after
            .get(..2)
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .is_some_and(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::{check_path, is_account_api, own_route_in_another_case, reads_stored_state};

    #[test]
    fn an_api_is_the_same_api_in_any_case() {
        for path in [
            "/v1/Files",
            "/v1/FILES/file-AbC/content",
            "/v1/Fine_Tuning/jobs",
            "/v1/chat/COMPLETIONS/chatcmpl-x",
            "/v1/Responses/resp_x",
        ] {
            assert!(is_account_api(path), "{path}");
        }
        // A computation keeps its ids' case, and is checked as the lower-case one is.
        assert!(!is_account_api("/v1/Embeddings"));
        let continued = br#"{"model":"a","input":"x","previous_response_id":"resp_x"}"#;
        assert!(
            reads_stored_state("/v1/Responses", continued)
                .unwrap()
                .is_some()
        );
        for (path, own) in [
            ("/v1/Chat/Completions", Some("/v1/chat/completions")),
            ("/v1/Models", Some("/v1/models")),
            ("/v1/MODELS/gpt-4o", Some("/v1/models")),
            ("/v1/Feedback", Some("/v1/feedback")),
            ("/v1/chat/completions/chatcmpl-x", None),
            ("/v1/feedback/x", None),
            ("/v1/feedback/X", None),
            ("/v1/Feedback/X", Some("/v1/feedback")),
            ("/v1/embeddings", None),
        ] {
            assert_eq!(own_route_in_another_case(path), own, "{path}");
        }
    }

    #[test]
    fn paths_that_could_be_read_two_ways_are_refused() {
        for ok in [
            "/v1/files",
            "/v1/files/file-abc/content",
            "/v1/fine_tuning/jobs/ftjob-1/events",
            "/v1/files/a%20b",
            "/v1/x%",
            "/v1/x%zz",
        ] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/v1/../admin",
            "/v1/%2e%2e/internal",
            "/v1/%2E./x",
            "/v1/./files",
            "/v1//chat/completions",
            "/v1/chat/completions/",
            "/v1/chat/completions;x",
            "/v1/files%2f..%2fadmin",
            "/v1/a\\..\\b",
            "/v1/chat/%63ompletions",
            "/v1/chat/completion%73",
            "/v1/%43hat/completions",
            "/v1/chat%2Dx",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }
}
