//! `key create|list|get|update|revoke`.

use sluice_proto::limits::MAX_KEY_PAGE_SIZE;
use sluice_proto::v1 as pb;
use sluice_proto::wkt::FieldMask;

use crate::args::{Expiry, KeyCommand, KeyUpdateArgs};
use crate::connection::Connection;
use crate::error::Error;
use crate::render::{self, Output};
use crate::time::to_timestamp;

/// Every client key (the active ones with `active_only`), page by page: each answer stays
/// small, whatever the number of keys ever issued (an unpaged list of them all grows past the
/// response limit).
pub(crate) async fn all_keys(
    connection: &Connection,
    active_only: bool,
) -> Result<Vec<pb::ClientKey>, Error> {
    let mut admin = connection.admin().await?;
    let mut keys = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = pb::ListClientKeysRequest {
            page_size: MAX_KEY_PAGE_SIZE as i32,
            page_token,
            active_only,
        };
        let page = connection.call(admin.list_client_keys(request)).await?;
        keys.extend(page.client_keys);
        if page.next_page_token.is_empty() {
            return Ok(keys);
        }
        page_token = page.next_page_token;
    }
}

pub async fn run(command: KeyCommand, connection: &Connection, out: &Output) -> Result<(), Error> {
    match command {
        KeyCommand::Create {
            name,
            allowed_models,
            rpm,
            limits,
            expires,
            budget,
        } => {
            let check = format!(
                "see `sluicectl key list` for a key named {name:?} (created so, it cannot be \
                 shown again: revoke it and create another)"
            );
            let request = pb::CreateClientKeyRequest {
                name,
                allowed_models,
                rpm_limit: rpm,
                expire_time: expires.map(to_timestamp),
                max_budget: budget.max_budget.unwrap_or(0.0),
                budget_period: budget
                    .budget_period
                    .map_or(pb::BudgetPeriod::Unspecified, pb::BudgetPeriod::from)
                    .into(),
                tpm_limit: limits.tpm_limit.unwrap_or(0),
                max_parallel_requests: limits.max_parallel.unwrap_or(0),
            };
            let mut admin = connection.admin().await?;
            let response = connection
                .call(admin.create_client_key(request))
                .await
                .map_err(|err| err.of_change(&check))?;
            out.print(&response, render::created_client_key)
        }
        KeyCommand::List { active } => {
            let response = pb::ListClientKeysResponse {
                client_keys: all_keys(connection, active).await?,
                next_page_token: String::new(),
            };
            let currency = currency(connection, out).await?;
            out.print(&response, |r| render::client_keys(r, &currency))
        }
        KeyCommand::Get { key } => {
            let request = pb::GetClientKeyRequest { id: key };
            let mut admin = connection.admin().await?;
            let response = connection.call(admin.get_client_key(request)).await?;
            let currency = currency(connection, out).await?;
            out.print(&response, |r| {
                render::client_key(r.client_key.as_ref(), &currency)
            })
        }
        KeyCommand::Update(args) => {
            // Built before connecting, so that "nothing to update" comes first.
            let request = update_request(&args)?;
            // Read before the change: failing after it, the run would say the change failed
            // although it was made.
            let currency = currency(connection, out).await?;
            let mut admin = connection.admin().await?;
            let response = connection
                .call(admin.update_client_key(request))
                .await
                .map_err(|err| err.of_change("read it back with `sluicectl key get`"))?;
            out.print(&response, |r| {
                render::client_key(r.client_key.as_ref(), &currency)
            })
        }
        KeyCommand::Revoke { key } => {
            let request = pb::RevokeClientKeyRequest { id: key.clone() };
            let mut admin = connection.admin().await?;
            let response = connection
                .call(admin.revoke_client_key(request))
                .await
                .map_err(|err| err.of_change("read it back with `sluicectl key get`"))?;
            out.print(&response, |_| format!("Revoked client key {key:?}."))
        }
    }
}

/// The currency of every cost and budget: a setting (`settings set --currency`). Not asked
/// for `-o json`, which does not show it.
async fn currency(connection: &Connection, out: &Output) -> Result<String, Error> {
    if out.is_json() {
        return Ok(String::new());
    }
    let mut admin = connection.admin().await?;
    let settings = connection
        .call(admin.get_settings(pb::GetSettingsRequest {}))
        .await?;
    Ok(settings.settings.map(|s| s.currency).unwrap_or_default())
}

/// A request whose mask names exactly the flags given.
fn update_request(args: &KeyUpdateArgs) -> Result<pb::UpdateClientKeyRequest, Error> {
    let mut key = pb::ClientKey {
        id: args.key.clone(),
        ..Default::default()
    };
    let mut paths = Vec::new();
    if let Some(name) = &args.name {
        key.name = name.clone();
        paths.push("name");
    }
    if args.all_models || !args.allowed_models.is_empty() {
        key.allowed_models = args.allowed_models.clone();
        paths.push("allowed_models");
    }
    if let Some(rpm) = args.rpm {
        key.rpm_limit = rpm;
        paths.push("rpm_limit");
    }
    if let Some(tpm) = args.limits.tpm_limit {
        key.tpm_limit = tpm;
        paths.push("tpm_limit");
    }
    if let Some(parallel) = args.limits.max_parallel {
        key.max_parallel_requests = parallel;
        paths.push("max_parallel_requests");
    }
    if let Some(expires) = args.expires {
        key.expire_time = match expires {
            Expiry::Never => None,
            Expiry::At(at) => Some(to_timestamp(at)),
        };
        paths.push("expire_time");
    }
    if let Some(max_budget) = args.budget.max_budget {
        key.max_budget = max_budget;
        paths.push("max_budget");
    }
    if let Some(period) = args.budget.budget_period {
        key.budget_period = pb::BudgetPeriod::from(period).into();
        paths.push("budget_period");
    }
    if paths.is_empty() {
        return Err(Error::Usage(
            "nothing to update: give at least one of --name, --allow-model, --all-models, \
             --rpm, --tpm-limit, --max-parallel, --expires, --max-budget, --budget-period"
                .to_owned(),
        ));
    }
    Ok(pb::UpdateClientKeyRequest {
        client_key: Some(key),
        update_mask: Some(FieldMask {
            paths: paths.into_iter().map(str::to_owned).collect(),
        }),
    })
}
