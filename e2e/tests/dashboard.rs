//! The web dashboard in headless Chromium against the real `sluice-control`, with real
//! usage from a `sluice-proxy` in front of the mock provider: sign in, see the charts
//! drawn (split by backend and by pool), manage backends and client keys through the
//! forms, look at replicas and cooldowns, change the settings and see a data plane follow;
//! no console errors, no dialog, API text stays text. Saves a screenshot of each page to
//! `e2e/artifacts/`; with `SLUICE_UPDATE_SCREENSHOTS=1` also refreshes the
//! committed `e2e/screenshots/dashboard-overview.png` and `dashboard-settings.png`.

#[path = "dashboard/cdp.rs"]
mod cdp;
use crate::common;

use std::path::PathBuf;
use std::time::Duration;

use cdp::Browser;
use common::{
    ADMIN_TOKEN, ControlApi, DATAPLANE_TOKEN, Gateway, Mock, control_plane, eventually,
    report_cooldown, report_model_cooldown,
};
use serde_json::json;
use sluice_e2e::process::{Child, spawn, workspace_bin};
use sluice_proto::v1 as pb;

const XSS: &str = "<img src=x onerror=alert(1)>";
const START: Duration = Duration::from_secs(30);

fn artifacts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("artifacts")
}

async fn data_plane(api: &ControlApi) -> (Child, Gateway) {
    let child = spawn(
        workspace_bin("sluice-proxy"),
        [
            "--control-plane".to_owned(),
            api.url.clone(),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--node-id".to_owned(),
            "replica-e2e".to_owned(),
        ],
        [
            ("SLUICE_DATAPLANE_TOKEN", DATAPLANE_TOKEN),
            ("RUST_LOG", "info"),
        ],
    )
    .unwrap();
    let addr = child.wait_for_listening("http", START).await.unwrap();
    let gateway = Gateway::at(addr.port());
    gateway.wait_ready().await;
    (child, gateway)
}

/// Enables or disables the backend `id` over gRPC (as another admin would).
async fn set_enabled(api: &ControlApi, id: &str, enabled: bool) {
    api.admin()
        .await
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(pb::Backend {
                id: id.into(),
                enabled,
                ..Default::default()
            }),
            update_mask: Some(sluice_proto::wkt::FieldMask {
                paths: vec!["enabled".into()],
            }),
            api_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// One served request of `backend_id`, reported as a replica reports it.
async fn report_usage(api: &ControlApi, backend_id: &str, sequence: u64, ago: Duration) {
    use sluice_proto::v1::data_plane_service_client::DataPlaneServiceClient;
    let mut client = DataPlaneServiceClient::with_interceptor(
        api.channel().await,
        common::Bearer(DATAPLANE_TOKEN.into()),
    );
    let now = (std::time::SystemTime::now() - ago)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let record = pb::UsageRecord {
        sequence,
        request_id: format!("req-deleted-backend-{sequence}"),
        backend_id: backend_id.into(),
        model: "gpt-4o-mini".into(),
        prompt_tokens: 10,
        completion_tokens: 5,
        status_code: 200,
        cost_nanos: 1_000,
        // A spoken answer its client left before the provider's usage: its tokens estimated,
        // 3 of them audio; 4 of its prompt read from the cache, 2 of its completion reasoning.
        tokens_estimated: true,
        audio_completion_tokens: 3,
        cached_prompt_tokens: 4,
        reasoning_tokens: 2,
        time: Some(sluice_proto::wkt::Timestamp {
            seconds: now.as_secs() as i64,
            nanos: 0,
        }),
        ..Default::default()
    };
    let mut acks = client
        .report_usage(tokio_stream::iter(vec![pb::ReportUsageRequest {
            node_id: "replica-usage".into(),
            incarnation: "inc-1".into(),
            records: vec![record],
            ..Default::default()
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        acks.message().await.unwrap().unwrap().acked_sequence,
        sequence
    );
}

async fn backend_names(api: &ControlApi) -> Vec<pb::Backend> {
    api.admin()
        .await
        .list_backends(pb::ListBackendsRequest {})
        .await
        .unwrap()
        .into_inner()
        .backends
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_browser() {
    // A control plane, a mock provider behind two backends, a data plane, real traffic.
    let dir = tempfile::tempdir().unwrap();
    let (_control, api, base) = control_plane(&dir, &[]).await;
    let mock = Mock::start("dash", &["gpt-4o-mini", "gpt-4o"]).await;
    let alpha = api
        .add_backend(
            "alpha",
            &mock,
            pb::Pool::Primary,
            1,
            &[("gpt-4o-mini", "gpt-4o-mini")],
        )
        .await;
    api.add_backend(
        "beta",
        &mock,
        pb::Pool::Fallback,
        1,
        &[("gpt-4o", "gpt-4o")],
    )
    .await;
    let (_load_key, load_secret) = api.create_key("load", &[]).await;
    let (_proxy, gateway) = data_plane(&api).await;
    for i in 0..10 {
        let model = if i % 3 == 0 { "gpt-4o" } else { "gpt-4o-mini" };
        let r = gateway.chat(&load_secret, model).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    eventually(
        Duration::from_secs(20),
        "usage of 10 requests reported",
        || async { api.totals().await.request_count == 10 },
    )
    .await;

    let browser = Browser::launch(&format!("{base}/api/"), 1366, 900).await;
    browser.self_check().await;
    browser.goto(&format!("{base}/")).await;

    // Sign in: a wrong token says so and is not kept.
    browser
        .wait_for(
            "!document.querySelector('#signin').hidden",
            "the sign-in form",
        )
        .await;
    browser.type_into("#signin-token", "not-the-token").await;
    browser.click("#signin-submit").await;
    browser
        .wait_for(
            "document.querySelector('#signin-error').textContent !== ''",
            "a sign-in error",
        )
        .await;
    assert!(
        browser
            .text("#signin-error")
            .await
            .contains("Wrong admin token")
    );
    assert_eq!(browser.eval("sessionStorage.length").await, json!(0));
    browser.type_into("#signin-token", ADMIN_TOKEN).await;
    browser.click("#signin-submit").await;
    browser
        .wait_for("!document.querySelector('#app').hidden", "the dashboard")
        .await;
    // The token lives in this tab's sessionStorage only: not in the URL, a cookie or localStorage.
    assert_eq!(
        browser
            .eval("sessionStorage.getItem('sluice.adminToken')")
            .await,
        json!(ADMIN_TOKEN)
    );
    assert_eq!(browser.eval("localStorage.length").await, json!(0));
    assert_eq!(browser.eval("document.cookie").await, json!(""));
    assert!(
        !browser
            .eval("location.href")
            .await
            .to_string()
            .contains(ADMIN_TOKEN)
    );

    // Overview: totals and charts from the real usage, split by backend.
    browser
        .wait_for(
            "document.querySelectorAll('#chart-requests path.series').length === 1",
            "the requests chart",
        )
        .await;
    let totals = browser.text("#totals").await;
    assert!(totals.contains("Requests10"), "{totals}");
    browser
        .eval(
            "(() => { const s = document.querySelector('#split'); s.value = 'backend'; \
             s.dispatchEvent(new Event('change')); })()",
        )
        .await;
    for chart in ["requests", "tokens", "cost", "latency"] {
        browser
            .wait_for(
                &format!(
                    "[...document.querySelectorAll('#chart-{chart} path.series')] \
                     .filter(p => /^M[\\d.]+,[\\d.]+/.test(p.getAttribute('d'))).length === 2"
                ),
                &format!("two series in the {chart} chart"),
            )
            .await;
    }
    let legend = browser.text("#chart-requests .legend").await;
    assert!(
        legend.contains("alpha") && legend.contains("beta"),
        "{legend}"
    );
    let table = browser.text("#overview-backends").await;
    assert!(
        table.contains("alpha") && table.contains("fallback"),
        "{table}"
    );
    let totals = browser.text("#totals").await;
    assert!(
        totals.contains("USD") && totals.contains("2 backends"),
        "{totals}"
    );
    browser
        .screenshot(&artifacts().join("dashboard-overview.png"))
        .await;

    // Day buckets are UTC days, named by their UTC date wherever the viewer is: in Pago Pago
    // (UTC−11) a bucket's start, 00:00 UTC, is the afternoon of the day before.
    browser
        .send(
            "Emulation.setTimezoneOverride",
            json!({"timezoneId": "Pacific/Pago_Pago"}),
        )
        .await;
    browser.click("#range button[data-range='30d']").await;
    browser
        .wait_for(
            "(() => { const t = [...document.querySelectorAll('#chart-requests rect.hover title')]; \
             return t.length >= 28 && t.at(-1).textContent.includes('(UTC)'); })()",
            "the requests chart in day buckets",
        )
        .await;
    let named = browser
        .eval(
            "[...document.querySelectorAll('#chart-requests rect.hover title')].at(-1) \
             .textContent.split('\\n')[0]",
        )
        .await;
    let today = browser
        .eval(
            "new Date().toLocaleString(undefined, {month: 'short', day: 'numeric', \
             timeZone: 'UTC'}) + ' (UTC)'",
        )
        .await;
    assert_eq!(named, today);
    browser
        .send("Emulation.setTimezoneOverride", json!({"timezoneId": ""}))
        .await;
    browser.click("#range button[data-range='24h']").await;

    // Split by pool: alpha is primary, beta fallback; the pools table counts each pool's
    // backends (6 requests went to alpha, 4 to beta).
    browser
        .eval(
            "(() => { const s = document.querySelector('#split'); s.value = 'pool'; \
             s.dispatchEvent(new Event('change')); })()",
        )
        .await;
    browser
        .wait_for(
            "(() => { const l = document.querySelector('#chart-requests .legend'); \
             return l && l.textContent.includes('primary') && l.textContent.includes('fallback') \
             && !l.textContent.includes('alpha'); })()",
            "the requests chart split by pool",
        )
        .await;
    let cells = |pool: &str| {
        format!(
            "[...document.querySelectorAll('#overview-pools tr[data-pool={pool}] td')] \
             .map(td => td.textContent)"
        )
    };
    let row = |value: serde_json::Value| -> Vec<String> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|cell| cell.as_str().unwrap().to_owned())
            .collect()
    };
    let primary = row(browser.eval(&cells("primary")).await);
    assert_eq!(primary[..3], ["primary", "1", "6"], "{primary:?}");
    let fallback = row(browser.eval(&cells("fallback")).await);
    assert_eq!(fallback[..3], ["fallback", "1", "4"], "{fallback:?}");
    assert!(fallback[6].ends_with("USD"), "{fallback:?}");
    browser
        .screenshot(&artifacts().join("dashboard-overview-pools.png"))
        .await;

    // Backends: a bad URL is refused beside the field; a good one is added and listed.
    browser.click("#nav a[data-page=backends]").await;
    browser
        .wait_for(
            "document.querySelector('#backends-table').textContent.includes('alpha')",
            "the backends list",
        )
        .await;
    browser.click("#backend-add").await;
    browser.type_into("#bf-name", "gamma").await;
    browser
        .type_into("#bf-base-url", "ftp://example.com/v1")
        .await;
    browser
        .type_into(
            "#bf-models .model-row input[name=model_name]",
            "gpt-4o-mini",
        )
        .await;
    browser
        .type_into("#bf-models .model-row input[name=input_price]", "0.15")
        .await;
    browser
        .type_into(
            "#bf-models .model-row input[name=cached_input_price]",
            "0.075",
        )
        .await;
    browser
        .type_into(
            "#bf-models .model-row input[name=cache_write_price]",
            "0.1875",
        )
        .await;
    browser
        .type_into(
            "#bf-models .model-row input[name=tiers]",
            "priority=2, flex=0.5",
        )
        .await;
    browser
        .type_into(
            "#bf-models .model-row input[name=long_context]",
            "272000:2:1.5",
        )
        .await;
    browser
        .type_into(
            "#bf-models .model-row input[name=call_prices]",
            "web_search=10, file_search=2.5",
        )
        .await;
    browser
        .type_into("#bf-models .model-row input[name=audio_prices]", "32/")
        .await;
    browser
        .type_into("#bf-api-key", "sk-gamma-secret-4321")
        .await;
    browser.click("#bf-save").await;
    browser
        .wait_for(
            "document.querySelector('[data-field=base_url] .field-error').textContent !== ''",
            "the base URL error",
        )
        .await;
    assert_eq!(
        browser.text("[data-field=base_url] .field-error").await,
        "must use http or https"
    );
    assert_eq!(
        browser
            .eval("document.querySelector('#bf-base-url').getAttribute('aria-invalid')")
            .await,
        json!("true")
    );
    browser
        .screenshot(&artifacts().join("dashboard-backends-error.png"))
        .await;
    browser.type_into("#bf-base-url", &mock.base_url()).await;
    browser.click("#bf-save").await;
    browser
        .wait_for(
            "document.querySelector('#backend-form').hidden && \
             document.querySelector('#backends-table').textContent.includes('gamma')",
            "gamma in the list",
        )
        .await;
    let gamma = backend_names(&api)
        .await
        .into_iter()
        .find(|b| b.name == "gamma")
        .expect("gamma stored");
    assert_eq!(gamma.base_url, mock.base_url());
    assert_eq!(gamma.models[0].name, "gpt-4o-mini");
    assert_eq!(gamma.models[0].input_price_per_mtok, 0.15);
    assert_eq!(gamma.models[0].cached_input_price_per_mtok, Some(0.075));
    assert_eq!(gamma.models[0].cache_write_price_per_mtok, Some(0.1875));
    // Audio in at 32, out at the output price.
    assert_eq!(gamma.models[0].audio_input_price_per_mtok, Some(32.0));
    assert_eq!(gamma.models[0].audio_output_price_per_mtok, None);
    let tiers = |route: &pb::ModelRoute| {
        route
            .tier_multipliers
            .iter()
            .map(|t| (t.tier.clone(), t.multiplier))
            .collect::<Vec<_>>()
    };
    let given = vec![("priority".to_owned(), 2.0), ("flex".to_owned(), 0.5)];
    assert_eq!(tiers(&gamma.models[0]), given);
    let calls = |route: &pb::ModelRoute| {
        route
            .call_prices
            .iter()
            .map(|c| (c.tool.clone(), c.price_per_thousand_calls))
            .collect::<Vec<_>>()
    };
    let priced = vec![
        ("web_search".to_owned(), 10.0),
        ("file_search".to_owned(), 2.5),
    ];
    assert_eq!(calls(&gamma.models[0]), priced);
    let band = Some(pb::LongContextPrices {
        above_prompt_tokens: 272_000,
        input_multiplier: 2.0,
        output_multiplier: 1.5,
    });
    assert_eq!(gamma.models[0].long_context, band);
    assert_eq!(gamma.api_key_hint, "4321");
    assert!(gamma.enabled);
    assert!(
        !browser
            .eval("document.body.innerText")
            .await
            .to_string()
            .contains("sk-gamma-secret"),
        "the API key is write-only"
    );

    // Edit gamma: the form starts from its values; an empty API key field keeps the key.
    let row = format!("#backends-table tr[data-backend-id='{}']", gamma.id);
    browser
        .click(&format!("{row} button[data-action=edit]"))
        .await;
    assert_eq!(
        browser
            .eval("document.querySelector('#bf-base-url').value")
            .await,
        json!(mock.base_url())
    );
    assert_eq!(
        browser
            .eval("document.querySelector('#bf-api-key').value")
            .await,
        json!("")
    );
    assert_eq!(
        browser
            .eval("document.querySelector('#bf-models .model-row input[name=tiers]').value")
            .await,
        json!("priority=2, flex=0.5")
    );
    assert_eq!(
        browser
            .eval("document.querySelector('#bf-models .model-row input[name=long_context]').value")
            .await,
        json!("272000:2:1.5")
    );
    assert_eq!(
        browser
            .eval("document.querySelector('#bf-models .model-row input[name=call_prices]').value")
            .await,
        json!("web_search=10, file_search=2.5")
    );
    assert_eq!(
        browser
            .eval("document.querySelector('#bf-models .model-row input[name=audio_prices]').value")
            .await,
        json!("32/")
    );
    browser.type_into("#bf-priority", "7").await;
    browser
        .type_into(
            "#bf-models .model-row input[name=upstream_name]",
            "gpt-4o-mini-2024",
        )
        .await;
    browser.click("#bf-save").await;
    browser
        .wait_for(
            "document.querySelector('#backend-form').hidden",
            "the edit saved",
        )
        .await;
    let edited = api
        .admin()
        .await
        .get_backend(pb::GetBackendRequest {
            id: gamma.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    assert_eq!(edited.priority, 7);
    assert_eq!(edited.models[0].upstream_name, "gpt-4o-mini-2024");
    assert_eq!(
        edited.models[0].cached_input_price_per_mtok,
        Some(0.075),
        "shown in the form, kept"
    );
    assert_eq!(
        edited.models[0].cache_write_price_per_mtok,
        Some(0.1875),
        "shown in the form, kept"
    );
    assert_eq!(tiers(&edited.models[0]), given, "shown in the form, kept");
    assert_eq!(calls(&edited.models[0]), priced, "shown in the form, kept");
    assert_eq!(
        edited.models[0].long_context, band,
        "shown in the form, kept"
    );
    // Emptied, the route has no cached price of its own (its cached tokens cost the input
    // price), not one the form no longer shows.
    browser
        .click(&format!("{row} button[data-action=edit]"))
        .await;
    for price in ["cached_input_price", "cache_write_price"] {
        set_value(
            &browser,
            &format!("#bf-models .model-row input[name={price}]"),
            "",
        )
        .await;
    }
    // Tiers written as answers do not report them are refused where they were typed.
    set_value(
        &browser,
        "#bf-models .model-row input[name=tiers]",
        "Priority=2",
    )
    .await;
    browser.click("#bf-save").await;
    browser
        .wait_for(
            "document.querySelector('.model-row [data-field=tier_multipliers] .field-error').textContent !== ''",
            "the tiers' error",
        )
        .await;
    set_value(&browser, "#bf-models .model-row input[name=tiers]", "").await;
    // A price past the most is refused where it was typed; emptied, the tools cost nothing.
    set_value(
        &browser,
        "#bf-models .model-row input[name=call_prices]",
        "web_search=2000000",
    )
    .await;
    browser.click("#bf-save").await;
    browser
        .wait_for(
            "document.querySelector('.model-row [data-field=call_prices] .field-error').textContent !== ''",
            "the call prices' error",
        )
        .await;
    set_value(
        &browser,
        "#bf-models .model-row input[name=call_prices]",
        "",
    )
    .await;
    // Audio prices are two, each a price or empty.
    set_value(
        &browser,
        "#bf-models .model-row input[name=audio_prices]",
        "32",
    )
    .await;
    browser.click("#bf-save").await;
    browser
        .wait_for(
            "document.querySelector('.model-row [data-field=audio_prices] .field-error').textContent !== ''",
            "the audio prices' error",
        )
        .await;
    set_value(
        &browser,
        "#bf-models .model-row input[name=audio_prices]",
        "",
    )
    .await;
    // An empty figure is a mistake, not a free output.
    set_value(
        &browser,
        "#bf-models .model-row input[name=long_context]",
        "272000:2:",
    )
    .await;
    browser.click("#bf-save").await;
    browser
        .wait_for(
            "document.querySelector('.model-row [data-field=long_context] .field-error').textContent !== ''",
            "the long-context band's error",
        )
        .await;
    set_value(
        &browser,
        "#bf-models .model-row input[name=long_context]",
        "",
    )
    .await;
    browser.click("#bf-save").await;
    browser
        .wait_for(
            "document.querySelector('#backend-form').hidden",
            "the cached price cleared",
        )
        .await;
    let cleared = backend_names(&api)
        .await
        .into_iter()
        .find(|b| b.name == "gamma")
        .unwrap();
    assert_eq!(cleared.models[0].cached_input_price_per_mtok, None);
    assert_eq!(cleared.models[0].cache_write_price_per_mtok, None);
    assert!(cleared.models[0].tier_multipliers.is_empty());
    assert!(cleared.models[0].call_prices.is_empty());
    assert_eq!(cleared.models[0].audio_input_price_per_mtok, None);
    assert_eq!(cleared.models[0].long_context, None);
    assert_eq!(cleared.models[0].input_price_per_mtok, 0.15);
    assert_eq!(edited.api_key_hint, "4321", "the key is kept");

    // Disable gamma, then delete it after confirming.
    browser
        .click(&format!("{row} button[data-action=disable]"))
        .await;
    browser
        .wait_for(
            &format!("document.querySelector(\"{row}\").textContent.includes('disabled')"),
            "gamma disabled",
        )
        .await;
    assert!(
        !backend_names(&api)
            .await
            .iter()
            .any(|b| b.name == "gamma" && b.enabled)
    );
    browser
        .click(&format!("{row} button[data-action=delete]"))
        .await;
    // It served a request before it goes: the Overview keeps its usage, as `gamma (deleted)`.
    report_usage(&api, &gamma.id, 1, Duration::ZERO).await;
    // Another admin deletes it meanwhile: the confirmed delete is refused, and the banner
    // says so until the next action (the page reloaded after an action cleared it at once).
    api.admin()
        .await
        .delete_backend(pb::DeleteBackendRequest {
            id: gamma.id.clone(),
        })
        .await
        .unwrap();
    browser
        .click(&format!("{row} button[data-action=confirm-delete]"))
        .await;
    let refused = "!document.querySelector('#banner').hidden \
        && document.querySelector('#banner').textContent.includes('not found')";
    browser
        .wait_for(refused, "the refused delete's error")
        .await;
    // The row goes with the page reload that follows the action (gamma was there when its
    // confirmation was clicked): past that reload, the error is still shown.
    browser
        .wait_for(&format!("!document.querySelector(\"{row}\")"), "gamma gone")
        .await;
    assert_eq!(browser.eval(&format!("Boolean({refused})")).await, true);
    assert!(!backend_names(&api).await.iter().any(|b| b.name == "gamma"));

    // A backend named like HTML stays text.
    browser.click("#backend-add").await;
    browser.type_into("#bf-name", XSS).await;
    browser.type_into("#bf-base-url", &mock.base_url()).await;
    browser
        .type_into("#bf-models .model-row input[name=model_name]", "gpt-4o")
        .await;
    browser.click("#bf-save").await;
    // The form closes before the list is reloaded: wait for the row itself.
    browser
        .wait_for(
            &format!(
                "document.querySelector('#backend-form').hidden && \
                 [...document.querySelectorAll('#backends-table td.name')] \
                 .some(td => td.textContent === {})",
                json!(XSS)
            ),
            "the XSS-named backend listed",
        )
        .await;
    let names = browser
        .eval("[...document.querySelectorAll('#backends-table td.name')].map(td => td.textContent)")
        .await;
    assert!(names.as_array().unwrap().contains(&json!(XSS)), "{names}");
    assert_eq!(
        browser
            .eval("document.querySelectorAll('img').length")
            .await,
        json!(0)
    );
    browser
        .screenshot(&artifacts().join("dashboard-backends.png"))
        .await;

    // Client keys: created (shown once, with a copy button), listed, revoked.
    browser.click("#nav a[data-page=keys]").await;
    browser.type_into("#kf-name", "team-x").await;
    browser.type_into("#kf-models", "gpt-4o-mini, gpt-4o").await;
    browser.click("#kf-create").await;
    browser
        .wait_for("!document.querySelector('#key-once').hidden", "the new key")
        .await;
    let key = browser
        .eval("document.querySelector('#key-once-value').value")
        .await;
    let key = key.as_str().unwrap().to_owned();
    assert!(key.starts_with("sk-sluice-"), "{key}");
    browser
        .wait_for(
            "document.querySelector('#keys-table').textContent.includes('team-x')",
            "team-x listed",
        )
        .await;
    // The key works at the gateway once the snapshot reaches it.
    eventually(Duration::from_secs(10), "the new key accepted", || async {
        gateway.chat(&key, "gpt-4o-mini").await.status() == 200
    })
    .await;
    browser.click("#key-once-copy").await;
    browser
        .wait_for(
            "document.querySelector('#key-once-status').textContent.length > 0",
            "copy feedback",
        )
        .await;
    browser
        .screenshot(&artifacts().join("dashboard-keys-created.png"))
        .await;
    browser.click("#key-once-done").await;
    assert!(
        !browser
            .eval("document.body.innerText")
            .await
            .as_str()
            .unwrap()
            .contains(&key),
        "the key is shown only once"
    );
    let keys = api
        .admin()
        .await
        .list_client_keys(pb::ListClientKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .client_keys;
    let team = keys.iter().find(|k| k.name == "team-x").unwrap();
    assert_eq!(team.allowed_models, ["gpt-4o-mini", "gpt-4o"]);
    let row = format!("#keys-table tr[data-key-id='{}']", team.id);
    browser
        .click(&format!("{row} button[data-action=revoke]"))
        .await;
    browser
        .click(&format!("{row} button[data-action=confirm-revoke]"))
        .await;
    // Revoked keys are left out of the list unless asked for.
    browser
        .wait_for(
            &format!("document.querySelector(\"{row}\") === null"),
            "team-x gone from the active keys",
        )
        .await;
    browser.click("#keys-revoked").await;
    browser
        .wait_for(
            &format!(
                "document.querySelector(\"{row}\") !== null && \
                 document.querySelector(\"{row}\").textContent.includes('revoked')"
            ),
            "team-x listed as revoked",
        )
        .await;
    eventually(
        Duration::from_secs(10),
        "the revoked key refused",
        || async { gateway.chat(&key, "gpt-4o-mini").await.status() == 401 },
    )
    .await;
    browser
        .screenshot(&artifacts().join("dashboard-keys.png"))
        .await;

    // Keys come 100 a page, oldest first: the page asks for one page, not every key.
    let mut admin = api.admin().await;
    for i in 0..105 {
        admin
            .create_client_key(pb::CreateClientKeyRequest {
                name: format!("bulk-{i:03}"),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let rows = "document.querySelectorAll('#keys-table tr[data-key-id]').length";
    let listed = |name: &str| {
        format!("document.querySelector('#keys-table').textContent.includes('{name}')")
    };
    browser
        .wait_for(
            &format!("{rows} === 100 && !document.querySelector('#keys-pager').hidden"),
            "a first page of 100 keys",
        )
        .await;
    // The load test's key, team-x (revoked, shown) and 98 bulk keys are on the first page.
    assert_eq!(browser.eval(&listed("bulk-097")).await, json!(true));
    assert_eq!(browser.eval(&listed("bulk-098")).await, json!(false));
    browser.click("#keys-next").await;
    browser
        .wait_for(&listed("bulk-104"), "the second page")
        .await;
    assert_eq!(browser.eval(rows).await, json!(7));
    assert_eq!(
        browser
            .eval("document.querySelector('#keys-range').textContent")
            .await,
        json!("Keys 101–107, oldest first")
    );
    browser.click("#keys-prev").await;
    browser
        .wait_for(&listed("bulk-000"), "the first page again")
        .await;
    assert_eq!(browser.eval(&listed("bulk-104")).await, json!(false));
    browser.click("#keys-revoked").await;

    // Replicas: the data plane, on the newest snapshot.
    browser.click("#nav a[data-page=replicas]").await;
    browser
        .wait_for(
            "document.querySelector('#replicas-table').textContent.includes('replica-e2e') && \
             document.querySelector('#replicas-table').textContent.includes('current')",
            "the replica, current",
        )
        .await;
    browser
        .screenshot(&artifacts().join("dashboard-replicas.png"))
        .await;

    // Cooldowns: a rate-limited backend shows with its reason and can be reset.
    report_cooldown(&api, &alpha.id, "429 from upstream").await;
    browser.click("#nav a[data-page=cooldowns]").await;
    browser
        .wait_for(
            "document.querySelector('#cooldowns-table').textContent.includes('429 from upstream')",
            "alpha's cooldown",
        )
        .await;
    assert!(browser.text("#cooldowns-table").await.contains("alpha"));
    browser
        .screenshot(&artifacts().join("dashboard-cooldowns.png"))
        .await;
    // Disabled while it cools down, it says both (it showed only its cooldown: an operator
    // who disabled it in an incident could not see that it took).
    set_enabled(&api, &alpha.id, false).await;
    browser.click("#nav a[data-page=backends]").await;
    let alpha_row = format!("#backends-table tr[data-backend-id='{}']", alpha.id);
    browser
        .wait_for(
            &format!(
                "(document.querySelector(\"{alpha_row}\") || {{textContent: ''}}).textContent \
                 .includes('disabled') && document.querySelector(\"{alpha_row}\").textContent \
                 .includes('rate-limited')"
            ),
            "alpha disabled and cooling down",
        )
        .await;
    set_enabled(&api, &alpha.id, true).await;
    browser.click("#nav a[data-page=cooldowns]").await;
    browser
        .wait_for(
            "document.querySelector('#cooldowns-table').textContent.includes('429 from upstream')",
            "alpha's cooldown again",
        )
        .await;
    browser
        .click("#cooldowns-table button[data-action=reset]")
        .await;
    browser
        .wait_for(
            "document.querySelector('#cooldowns-table').textContent.includes('No backend is cooling down')",
            "the cooldown reset",
        )
        .await;
    // One model cooling down at alpha: alpha serves its other models, and says which.
    report_model_cooldown(&api, &alpha.id, "gpt-4o-mini", "429 from upstream").await;
    browser.click("#nav a[data-page=backends]").await;
    browser
        .wait_for(
            &format!(
                "(document.querySelector(\"{alpha_row}\") || {{textContent: ''}}).textContent \
                 .includes('1 model cooling down') && document.querySelector(\"{alpha_row}\") \
                 .textContent.includes('gpt-4o-mini until')"
            ),
            "alpha's model cooling down",
        )
        .await;
    let alpha_state = browser.text(&alpha_row).await;
    assert!(alpha_state.contains("enabled"), "{alpha_state}");
    assert!(!alpha_state.contains("rate-limited"), "{alpha_state}");
    browser.click("#nav a[data-page=cooldowns]").await;
    browser
        .wait_for(
            "document.querySelector('#cooldowns-table').textContent.includes('gpt-4o-mini')",
            "the model's cooldown",
        )
        .await;
    browser
        .click("#cooldowns-table button[data-action=reset]")
        .await;
    browser
        .wait_for(
            "document.querySelector('#cooldowns-table').textContent.includes('No backend is cooling down')",
            "the model's cooldown reset",
        )
        .await;

    // Settings: the stored policy; a refused value is shown beside its field and changes
    // nothing; a saved change reaches the data plane.
    browser.click("#nav a[data-page=settings]").await;
    browser
        .wait_for(
            "document.querySelector('#sf-max-attempts').value === '3' && \
             document.querySelector('#sf-cooldown-cap').value === '300' && \
             document.querySelector('#sf-currency').value === 'USD'",
            "the settings form filled in",
        )
        .await;
    browser.type_into("#sf-max-attempts", "11").await;
    browser.click("#sf-save").await;
    browser
        .wait_for(
            "document.querySelector('[data-field=max_attempts] .field-error').textContent !== ''",
            "the max attempts error",
        )
        .await;
    assert_eq!(
        browser.text("[data-field=max_attempts] .field-error").await,
        "must be between 1 and 10"
    );
    assert_eq!(
        browser
            .eval("document.querySelector('#sf-max-attempts').getAttribute('aria-invalid')")
            .await,
        json!("true")
    );
    let settings = || async {
        api.admin()
            .await
            .get_settings(pb::GetSettingsRequest {})
            .await
            .unwrap()
            .into_inner()
            .settings
            .unwrap()
    };
    assert_eq!(
        settings().await.max_attempts,
        3,
        "a refused value is not stored"
    );
    browser
        .screenshot(&artifacts().join("dashboard-settings-error.png"))
        .await;
    assert!(
        gateway
            .chat(&load_secret, "gpt-4o-mini")
            .await
            .headers()
            .get("x-sluice-backend")
            .is_none(),
        "the backend header is off by default"
    );
    browser.type_into("#sf-max-attempts", "4").await;
    browser.type_into("#sf-cooldown-cap", "120").await;
    browser.type_into("#sf-currency", "EUR").await;
    browser.click("#sf-expose-backend-header").await;
    browser.click("#sf-save").await;
    browser
        .wait_for(
            "document.querySelector('#notice').textContent.startsWith('Saved the settings')",
            "the settings saved",
        )
        .await;
    let saved = settings().await;
    assert_eq!(saved.max_attempts, 4);
    assert_eq!(saved.cooldown_cap.unwrap().seconds, 120);
    assert_eq!(saved.currency, "EUR");
    assert!(saved.expose_backend_header);
    assert_eq!(
        saved.cooldown_base.unwrap().seconds,
        1,
        "unchanged fields kept"
    );
    // The data plane applies the change with its next snapshot: answers now name the backend.
    eventually(
        Duration::from_secs(10),
        "x-sluice-backend on the data plane's answers",
        || async {
            let answer = gateway.chat(&load_secret, "gpt-4o-mini").await;
            answer.status() == 200
                && answer
                    .headers()
                    .get("x-sluice-backend")
                    .is_some_and(|v| v == "alpha")
        },
    )
    .await;
    browser
        .screenshot(&artifacts().join("dashboard-settings.png"))
        .await;

    // A small laptop screen: the page does not scroll sideways (wide tables scroll in place).
    browser.resize(1024, 700).await;
    browser.click("#nav a[data-page=overview]").await;
    // The deleted backend's usage has a row of its own: the rows add up to the totals.
    browser
        .wait_for(
            "document.querySelector('#overview-backends').textContent.includes('gamma (deleted)')",
            "the deleted backend's row",
        )
        .await;
    // Its one request has no latency known (its tokens estimated, as a crash leaves them):
    // a dash, not "0 ms"; its cost, a thousandth of a cent, is not shown as none.
    let cells = browser
        .eval(
            "(() => { const r = [...document.querySelectorAll('#overview-backends tr')].find(r => \
             r.textContent.includes('gamma (deleted)')); \
             return [r.cells[5].textContent, r.cells[6].textContent]; })()",
        )
        .await;
    assert_eq!(cells[0], "–", "{cells}");
    assert!(
        cells[1]
            .as_str()
            .unwrap_or_default()
            .starts_with("0.000001"),
        "{cells}"
    );
    // Its estimate and its parts (cached, reasoning, audio) are named in the totals, the only
    // ones there were.
    let totals = browser.text("#totals").await;
    assert!(
        totals.contains(" streamed · 1 estimated · ")
            && totals.contains(" prompt (4 cached) · ")
            && totals.contains(" completion (2 reasoning) · 3 audio"),
        "{totals}"
    );
    browser
        .wait_for(
            "document.querySelectorAll('#chart-requests path.series').length === 2",
            "the overview at 1024 px",
        )
        .await;
    browser
        .wait_for(
            "[...document.querySelectorAll('.chart svg')].every(svg => \
             svg.viewBox.baseVal.width === svg.parentElement.clientWidth)",
            "the charts redrawn to fit their boxes",
        )
        .await;
    assert_eq!(
        browser
            .eval("document.documentElement.scrollWidth <= window.innerWidth")
            .await,
        json!(true),
        "no horizontal scrolling at 1024 px"
    );
    // Costs carry the currency the settings now name.
    browser
        .wait_for(
            "document.querySelector('#totals').textContent.includes('EUR') && \
             document.querySelector('#chart-cost').parentElement.textContent.includes('(EUR)')",
            "costs in EUR",
        )
        .await;
    browser
        .screenshot(&artifacts().join("dashboard-overview-1024.png"))
        .await;
    // With every hour kept there is nothing to say; with the hours kept for 3 days and usage
    // 5 days old, the 7-day overview says what its hourly charts and its totals' first day
    // cannot count.
    assert!(browser.text("#hours-note").await.is_empty());
    report_usage(&api, "gone-backend", 2, Duration::from_secs(5 * 86_400)).await;
    api.set_settings(
        pb::Settings {
            usage_retention_days: 3,
            ..Default::default()
        },
        &["usage_retention_days"],
    )
    .await;
    browser.click("#range button[data-range='7d']").await;
    browser
        .wait_for(
            "!document.querySelector('#hours-note').hidden && \
             document.querySelector('#hours-note').textContent.includes('kept by the whole day only')",
            "the note on hours past the hourly retention",
        )
        .await;

    // Sign out forgets the token.
    browser.click("#signout").await;
    browser
        .wait_for(
            "!document.querySelector('#signin').hidden",
            "the sign-in form again",
        )
        .await;
    assert_eq!(browser.eval("sessionStorage.length").await, json!(0));

    let problems = browser.problems();
    assert!(
        problems.dialogs.is_empty(),
        "dialogs opened: {:?}",
        problems.dialogs
    );
    assert!(
        problems.errors.is_empty(),
        "browser errors: {:#?}",
        problems.errors
    );
    browser.close().await;

    if std::env::var_os("SLUICE_UPDATE_SCREENSHOTS").is_some() {
        let committed = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("screenshots");
        std::fs::create_dir_all(&committed).unwrap();
        for name in ["dashboard-overview.png", "dashboard-settings.png"] {
            std::fs::copy(artifacts().join(name), committed.join(name)).unwrap();
        }
    }
}

/// Sets an input or select by script (a date-time picker takes no typed text) and tells the
/// page, as a user's edit would.
async fn set_value(browser: &Browser, selector: &str, value: &str) {
    browser
        .eval(&format!(
            "(() => {{ const e = document.querySelector({}); e.value = {}; \
             e.dispatchEvent(new Event('input', {{bubbles: true}})); \
             e.dispatchEvent(new Event('change', {{bubbles: true}})); }})()",
            json!(selector),
            json!(value)
        ))
        .await;
}

/// Saves the key's edit form and waits until it closes (the control plane took the change).
async fn save_key_form(browser: &Browser, what: &str) {
    browser.click("#ke-save").await;
    browser
        .wait_for("document.querySelector('#key-edit-form').hidden", what)
        .await;
}

/// `now + seconds` as the page's datetime-local inputs show it (the browser's local time).
const LOCAL_IN: &str = "((s) => { const d = new Date(Date.now() + s * 1000); \
     const p = (n) => String(n).padStart(2, '0'); \
     return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`; })";

/// What a key's answer at the gateway says: status and the error's `code`, if any.
async fn answer_of(gateway: &Gateway, key: &str) -> (u16, String) {
    let r = gateway.chat(key, "gpt-4o-mini").await;
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_limits_and_expiry_are_set_in_the_dashboard_and_applied_by_the_data_plane() {
    let dir = tempfile::tempdir().unwrap();
    let (_control, api, base) = control_plane(&dir, &[]).await;
    let mock = Mock::start("dash-budget", &["gpt-4o-mini"]).await;
    api.add_backend(
        "alpha",
        &mock,
        pb::Pool::Primary,
        1,
        &[("gpt-4o-mini", "gpt-4o-mini")],
    )
    .await;
    let (_proxy, gateway) = data_plane(&api).await;

    let browser = Browser::launch(&format!("{base}/api/"), 1366, 900).await;
    browser.goto(&format!("{base}/#keys")).await;
    browser.type_into("#signin-token", ADMIN_TOKEN).await;
    browser.click("#signin-submit").await;
    browser
        .wait_for(
            "!document.querySelector('#page-keys').hidden",
            "the keys page",
        )
        .await;

    // Created with a monthly budget from the form.
    browser.type_into("#kf-name", "team-b").await;
    browser.type_into("#kf-budget", "0.5").await;
    set_value(&browser, "#kf-period", "BUDGET_PERIOD_MONTHLY").await;
    browser.type_into("#kf-tpm", "100000").await;
    browser.type_into("#kf-parallel", "8").await;
    browser.click("#kf-create").await;
    browser
        .wait_for("!document.querySelector('#key-once').hidden", "the new key")
        .await;
    let secret = browser
        .eval("document.querySelector('#key-once-value').value")
        .await
        .as_str()
        .unwrap()
        .to_owned();
    browser.click("#key-once-done").await;
    let stored = api.client_key("team-b").await;
    assert_eq!(stored.max_budget, 0.5);
    assert_eq!(stored.budget_period, pb::BudgetPeriod::Monthly as i32);
    assert_eq!(stored.expire_time, None);
    assert_eq!(
        (stored.tpm_limit, stored.max_parallel_requests),
        (100_000, 8)
    );
    let row = format!("#keys-table tr[data-key-id='{}']", stored.id);

    // Real traffic through the data plane: the row's bar shows the spend against the budget.
    eventually(Duration::from_secs(10), "the new key served", || async {
        gateway.chat(&secret, "gpt-4o-mini").await.status() == 200
    })
    .await;
    for _ in 0..4 {
        assert_eq!(answer_of(&gateway, &secret).await, (200, String::new()));
    }
    let mock_served = mock.stats().await;
    let spent =
        (mock_served.prompt_tokens as f64 + 2.0 * mock_served.completion_tokens as f64) / 1e6;
    eventually(Duration::from_secs(20), "the spend counted", || async {
        (api.client_key("team-b").await.spend - spent).abs() < 1e-12
    })
    .await;
    // The page reloads the keys every 5 s; going to the page loads them at once.
    browser.click("#nav a[data-page=overview]").await;
    browser.click("#nav a[data-page=keys]").await;
    let meter = format!("{row} meter.spend");
    browser
        .wait_for(
            &format!(
                "(() => {{ const m = document.querySelector(\"{meter}\"); \
                 return m && Math.abs(m.value - {spent}) < 1e-12 && m.max === 0.5; }})()"
            ),
            "the spend bar at the key's spend",
        )
        .await;
    let cell = browser.text(&format!("{row} td.budget")).await;
    assert!(cell.contains("/ 0.5 USD"), "{cell}");
    assert!(cell.contains("left") && cell.contains("resets"), "{cell}");
    browser
        .screenshot(&artifacts().join("dashboard-keys-budget.png"))
        .await;

    // A refused value is shown beside its field and stores nothing.
    browser
        .click(&format!("{row} button[data-action=edit]"))
        .await;
    assert_eq!(
        browser
            .eval("document.querySelector('#ke-budget').value")
            .await,
        json!("0.5")
    );
    set_value(&browser, "#ke-expire", "2020-01-01T00:00:00").await;
    browser.type_into("#ke-rpm", "5").await;
    browser.click("#ke-save").await;
    browser
        .wait_for(
            "document.querySelector('#key-edit-form [data-field=expire_time] .field-error').textContent !== ''",
            "the expiry error",
        )
        .await;
    assert_eq!(
        browser
            .text("#key-edit-form [data-field=expire_time] .field-error")
            .await,
        "must be in the future"
    );
    // So is a TPM limit past its bound.
    set_value(&browser, "#ke-expire", "").await;
    browser.type_into("#ke-tpm", "2000000000").await;
    browser.click("#ke-save").await;
    browser
        .wait_for(
            "document.querySelector('#key-edit-form [data-field=tpm_limit] .field-error').textContent !== ''",
            "the TPM error",
        )
        .await;
    let tpm_error = browser
        .text("#key-edit-form [data-field=tpm_limit] .field-error")
        .await;
    assert!(tpm_error.starts_with("must be at most"), "{tpm_error}");
    let unchanged = api.client_key("team-b").await;
    assert_eq!(
        (
            unchanged.rpm_limit,
            unchanged.expire_time,
            unchanged.tpm_limit
        ),
        (0, None, 100_000),
        "a refused update stores nothing"
    );
    // Text the browser cannot read as a number ('5e': the input's value is then '') is
    // refused, not taken for an empty field and saved as 0, no limit.
    browser.type_into("#ke-tpm", "5e").await;
    browser.click("#ke-save").await;
    browser
        .wait_for(
            "document.querySelector('#key-edit-form [data-field=tpm_limit] .field-error').textContent === 'must be a whole number from 0 to 4294967295'",
            "the unreadable TPM refused",
        )
        .await;
    assert!(
        !browser
            .eval("document.querySelector('#key-edit-form').hidden")
            .await
            .as_bool()
            .unwrap()
    );
    assert_eq!(api.client_key("team-b").await.tpm_limit, 100_000);
    // Past what the field holds (32 bits): refused beside the field, where the API answered
    // with a message naming no field.
    browser.type_into("#ke-tpm", "100000").await;
    browser.type_into("#ke-rpm", "5000000000").await;
    browser.click("#ke-save").await;
    browser
        .wait_for(
            "document.querySelector('#key-edit-form [data-field=rpm_limit] .field-error').textContent === 'must be a whole number from 0 to 4294967295'",
            "the RPM past 32 bits refused",
        )
        .await;

    // A budget below the spend: the data plane refuses the key as out of quota.
    browser.type_into("#ke-rpm", "0").await;
    browser.type_into("#ke-tpm", "100000").await;
    browser.type_into("#ke-budget", "0.00001").await;
    save_key_form(&browser, "the budget saved").await;
    assert!((api.client_key("team-b").await.max_budget - 0.000_01).abs() < 1e-15);
    eventually(
        Duration::from_secs(10),
        "the key refused for its budget",
        || async { answer_of(&gateway, &secret).await == (429, "insufficient_quota".into()) },
    )
    .await;
    browser
        .wait_for(
            &format!("document.querySelector(\"{row}\").textContent.includes('budget spent')"),
            "the key shown as spent",
        )
        .await;

    // Budget raised and an RPM limit of 1: served once, then rate-limited.
    browser
        .click(&format!("{row} button[data-action=edit]"))
        .await;
    browser.type_into("#ke-budget", "1").await;
    browser.type_into("#ke-rpm", "1").await;
    browser.type_into("#ke-tpm", "5000").await;
    browser.type_into("#ke-parallel", "2").await;
    save_key_form(&browser, "the limits saved").await;
    let limited = api.client_key("team-b").await;
    assert_eq!(
        (
            limited.max_budget,
            limited.rpm_limit,
            limited.tpm_limit,
            limited.max_parallel_requests
        ),
        (1.0, 1, 5000, 2)
    );
    // The form closes before the list is reloaded: wait for the row itself.
    browser
        .wait_for(
            &format!(
                "(() => {{ const t = document.querySelector(\"{row} td:nth-child(4)\").textContent; \
                 return t.includes('1 req/min') && t.includes('5,000 tok/min') && \
                 t.includes('2 at once'); }})()"
            ),
            "the key's new limits listed",
        )
        .await;
    eventually(
        Duration::from_secs(10),
        "the key rate-limited at 1/min",
        || async { answer_of(&gateway, &secret).await == (429, "rate_limit_exceeded".into()) },
    )
    .await;

    // An expiry a few seconds ahead: the data plane refuses the key as expired once it passes.
    browser
        .click(&format!("{row} button[data-action=edit]"))
        .await;
    browser.type_into("#ke-rpm", "0").await;
    let soon = browser.eval(&format!("{LOCAL_IN}(4)")).await;
    set_value(&browser, "#ke-expire", soon.as_str().unwrap()).await;
    save_key_form(&browser, "the expiry saved").await;
    let expiring = api.client_key("team-b").await;
    assert!(expiring.expire_time.is_some());
    assert_eq!(expiring.rpm_limit, 0);
    eventually(
        Duration::from_secs(20),
        "the key refused as expired",
        || async { answer_of(&gateway, &secret).await == (401, "api_key_expired".into()) },
    )
    .await;
    browser
        .wait_for(
            &format!("document.querySelector(\"{row}\").textContent.includes('expired')"),
            "the key shown as expired",
        )
        .await;
    browser
        .screenshot(&artifacts().join("dashboard-keys-expired.png"))
        .await;

    // Cleared: the key never expires and is served again.
    browser
        .click(&format!("{row} button[data-action=edit]"))
        .await;
    set_value(&browser, "#ke-expire", "").await;
    save_key_form(&browser, "the expiry cleared").await;
    assert_eq!(api.client_key("team-b").await.expire_time, None);
    eventually(Duration::from_secs(10), "the key served again", || async {
        answer_of(&gateway, &secret).await == (200, String::new())
    })
    .await;
    browser
        .wait_for(
            &format!(
                "[...document.querySelectorAll(\"{row} td\")].some(td => td.textContent === 'never')"
            ),
            "the key shown as never expiring",
        )
        .await;

    // A backend's TPM limit, beside its RPM limit.
    browser.click("#nav a[data-page=backends]").await;
    browser
        .click("#backends-table tr[data-backend-id] button[data-action=edit]")
        .await;
    browser.type_into("#bf-tpm", "50000").await;
    browser.click("#bf-save").await;
    browser
        .wait_for(
            "document.querySelector('#backend-form').hidden && \
             document.querySelector('#backends-table').textContent.includes('50,000 tok/min')",
            "the backend's TPM limit saved",
        )
        .await;
    assert_eq!(backend_names(&api).await[0].tpm_limit, 50_000);

    let problems = browser.problems();
    assert!(problems.dialogs.is_empty(), "{:?}", problems.dialogs);
    assert!(problems.errors.is_empty(), "{:#?}", problems.errors);
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_backend_is_added_and_edited_in_the_dashboard_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let (_control, api, base) = control_plane(&dir, &[]).await;
    let claude = Mock::start("dash-claude", &["claude-up"]).await;
    let (_proxy, gateway) = data_plane(&api).await;
    let (_, secret) = api.create_key("client", &[]).await;

    let browser = Browser::launch(&format!("{base}/api/"), 1366, 900).await;
    browser.goto(&format!("{base}/#backends")).await;
    browser.type_into("#signin-token", ADMIN_TOKEN).await;
    browser.click("#signin-submit").await;
    browser
        .wait_for(
            "!document.querySelector('#page-backends').hidden",
            "the backends page",
        )
        .await;

    // Added as an Anthropic backend, with its version, a model's default max_tokens and its
    // output cap.
    browser.click("#backend-add").await;
    browser.type_into("#bf-name", "claude").await;
    browser.type_into("#bf-base-url", &claude.base_url()).await;
    set_value(&browser, "#bf-api-format", "API_FORMAT_ANTHROPIC").await;
    browser
        .type_into("#bf-anthropic-version", "2023-06-01")
        .await;
    browser
        .type_into("#bf-models .model-row input[name=model_name]", "claude")
        .await;
    browser
        .type_into(
            "#bf-models .model-row input[name=upstream_name]",
            "claude-up",
        )
        .await;
    browser
        .type_into("#bf-models .model-row input[name=default_max_tokens]", "-3")
        .await;
    browser
        .type_into("#bf-models .model-row input[name=max_output_tokens]", "1.5")
        .await;
    browser
        .type_into("#bf-api-key", claude.api_key.as_deref().unwrap())
        .await;
    // A bad number is shown beside its field, and nothing is saved.
    browser.click("#bf-save").await;
    browser
        .wait_for(
            "document.querySelector('#bf-models [data-field=default_max_tokens] .field-error').textContent !== ''",
            "the max_tokens error",
        )
        .await;
    assert_eq!(
        browser
            .text("#bf-models [data-field=max_output_tokens] .field-error")
            .await,
        "must be a whole number from 0 to 4294967295"
    );
    assert!(backend_names(&api).await.is_empty());
    browser
        .type_into(
            "#bf-models .model-row input[name=default_max_tokens]",
            "2048",
        )
        .await;
    browser
        .type_into(
            "#bf-models .model-row input[name=max_output_tokens]",
            "1500",
        )
        .await;
    browser.click("#bf-save").await;
    browser
        .wait_for(
            "document.querySelector('#backend-form').hidden && \
             document.querySelector('#backends-table').textContent.includes('claude')",
            "the new backend listed",
        )
        .await;
    let stored = backend_names(&api).await.remove(0);
    assert_eq!(stored.api_format, pb::ApiFormat::Anthropic as i32);
    assert_eq!(stored.anthropic_version, "2023-06-01");
    assert_eq!(stored.models[0].default_max_tokens, 2048);
    assert_eq!(stored.models[0].max_output_tokens, 1500);
    assert_eq!(stored.responses_api, None, "left to its API's default");
    let row = format!("#backends-table tr[data-backend-id='{}']", stored.id);
    let api_cell = browser.text(&format!("{row} td.api")).await;
    assert!(api_cell.starts_with("Anthropic"), "{api_cell}");
    assert!(api_cell.contains("2023-06-01"), "{api_cell}");
    let listed = browser.text(&row).await;
    assert!(listed.contains("max_tokens 2,048"), "{listed}");
    assert!(listed.contains("max output 1,500"), "{listed}");

    // Served as configured: a chat client without max_tokens gets the route's default,
    // lowered to its output cap; a Messages client's own version wins over the backend's.
    eventually(Duration::from_secs(10), "the backend served", || async {
        gateway.chat(&secret, "claude").await.status() == 200
    })
    .await;
    let upstream = claude.last_messages().await.unwrap();
    let sent: serde_json::Value = serde_json::from_str(&upstream.body).unwrap();
    assert_eq!(sent["max_tokens"], 1500, "{sent}");
    assert_eq!(upstream.header("anthropic-version"), Some("2023-06-01"));

    // Edited: the form shows what is stored; the Responses API is switched off explicitly
    // and the version cleared (back to the SDK's).
    browser
        .click(&format!("{row} button[data-action=edit]"))
        .await;
    assert_eq!(
        browser
            .eval("document.querySelector('#bf-api-format').value")
            .await,
        json!("API_FORMAT_ANTHROPIC")
    );
    assert_eq!(
        browser
            .eval("document.querySelector('#bf-anthropic-version').value")
            .await,
        json!("2023-06-01")
    );
    assert_eq!(
        browser
            .eval("document.querySelector('#bf-models input[name=default_max_tokens]').value")
            .await,
        json!("2048")
    );
    assert_eq!(
        browser
            .eval("document.querySelector('#bf-models input[name=max_output_tokens]').value")
            .await,
        json!("1500")
    );
    set_value(&browser, "#bf-responses-api", "false").await;
    set_value(&browser, "#bf-anthropic-version", "").await;
    // Meanwhile another admin disables the backend (an incident): the form still shows it
    // enabled, and its save sends only what was changed in it, so the backend stays off.
    let open = backend_names(&api).await.remove(0);
    set_enabled(&api, &open.id, false).await;
    browser.click("#bf-save").await;
    browser
        .wait_for(
            "document.querySelector('#backend-form').hidden",
            "the edit saved",
        )
        .await;
    let stored = backend_names(&api).await.remove(0);
    assert_eq!(stored.responses_api, Some(false));
    assert_eq!(stored.anthropic_version, "");
    assert_eq!(stored.api_format, pb::ApiFormat::Anthropic as i32);
    assert_eq!(stored.models[0].default_max_tokens, 2048);
    assert_eq!(stored.models[0].max_output_tokens, 1500);
    assert!(!stored.enabled, "the other admin's change stands");
    browser
        .screenshot(&artifacts().join("dashboard-backends-anthropic.png"))
        .await;

    let problems = browser.problems();
    assert!(problems.dialogs.is_empty(), "{:?}", problems.dialogs);
    assert!(problems.errors.is_empty(), "{:#?}", problems.errors);
    browser.close().await;
}
