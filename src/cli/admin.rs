//! `confab tenant|key|admin`: the operator's commands. Each is one call of
//! [`crate::admin::Admin`] (the same code as `/admin/v1`), and `--json` prints the object
//! that API operation answers, so the two cannot disagree.

use anyhow::bail;
use chrono::{DateTime, Utc};
use poem_openapi::types::ToJSON;

use crate::admin::{Admin, TenantUpdate};
use crate::api::admin_dto::{
    AdminUsageDto, AuditPageDto, CreatedKeyDto, CreatedTenantDto, KeyDto, KeyListDto, TenantDto,
    UsageGroupDto,
};
use crate::config::{AdminCommand, AdminKeyCommand, KeyCommand, TenantCommand, UsageGroupArg};
use crate::domain::{AuditAction, Order, Page, PageRequest};
use crate::store::{AuditEntry, AuditFilter, KeyInfo, TenantInfo};

fn print_json(v: &impl ToJSON) {
    println!("{}", v.to_json().unwrap_or_default());
}

fn when(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

fn print_tenant(t: &TenantInfo) {
    let show = |v: Option<u32>| v.map_or("default".to_string(), |n| n.to_string());
    println!("tenant {} ({})", t.name, t.id);
    println!("  created:  {}", when(Some(t.created_at)));
    println!("  keys:     {} working", t.active_keys);
    println!(
        "  limits:   requests_per_minute={} ws_messages_per_second={} max_connections={}",
        show(t.limits.requests_per_minute),
        show(t.limits.ws_messages_per_second),
        show(t.limits.max_connections)
    );
    let tokens = |v: Option<u64>| v.map_or("none".to_string(), |n| n.to_string());
    let b = &t.budgets;
    println!(
        "  budgets:  tokens_per_day={} tokens_per_month={} user_tokens_per_day={} user_tokens_per_month={}",
        tokens(b.tokens_per_day),
        tokens(b.tokens_per_month),
        tokens(b.user_tokens_per_day),
        tokens(b.user_tokens_per_month)
    );
    match t.disabled_at {
        Some(at) => println!("  state:    disabled since {}", when(Some(at))),
        None => println!("  state:    enabled"),
    }
}

fn tenant_or_json(t: TenantInfo, json: bool) {
    if json {
        print_json(&TenantDto::from(t));
    } else {
        print_tenant(&t);
    }
}

fn print_keys(keys: Vec<KeyInfo>) {
    println!(
        "{:<36}  {:<14}  {:<20}  {:<19}  {:<19}  {:<19}  revoked",
        "id", "prefix", "name", "created", "expires", "last used"
    );
    for k in keys {
        println!(
            "{:<36}  {:<14}  {:<20}  {:<19}  {:<19}  {:<19}  {}",
            k.id,
            k.prefix,
            k.name.as_deref().unwrap_or("-"),
            when(Some(k.created_at)),
            when(k.expires_at),
            when(k.last_used_at),
            when(k.revoked_at)
        );
    }
}

fn keys_or_json(keys: Vec<KeyInfo>, json: bool) {
    if json {
        print_json(&KeyListDto {
            keys: keys.into_iter().map(KeyDto::from).collect(),
        });
    } else {
        print_keys(keys);
    }
}

pub async fn tenant(admin: &Admin, cmd: TenantCommand) -> anyhow::Result<()> {
    match cmd {
        TenantCommand::Create {
            name,
            limits,
            budgets,
            json,
        } => {
            let settings = TenantUpdate {
                name: None,
                limits: limits.patch(),
                budgets: budgets.patch(),
            };
            let (t, k, key) = admin.create_tenant(&name, settings).await?;
            if json {
                print_json(&CreatedTenantDto {
                    tenant: t.into(),
                    key: k.into(),
                    api_key: key.secret,
                });
            } else {
                println!("tenant {} created: {}", t.name, t.id);
                println!("API key (shown only this once): {}", key.secret);
            }
        }
        TenantCommand::List {
            offset,
            limit,
            json,
        } => {
            let page = |offset| PageRequest {
                offset,
                limit,
                order: Order::Asc,
            };
            if json {
                let p = admin.list_tenants(page(offset)).await?;
                print_json(&crate::api::admin_dto::TenantListDto::from(p));
                return Ok(());
            }
            println!(
                "{:<36}  {:<24}  {:>4}  {:<8}  created",
                "id", "name", "keys", "state"
            );
            let mut at = offset;
            loop {
                let p = admin.list_tenants(page(at)).await?;
                let more = p.has_more();
                at += p.items.len() as u64;
                for t in p.items {
                    let state = if t.disabled_at.is_some() {
                        "disabled"
                    } else {
                        "enabled"
                    };
                    println!(
                        "{:<36}  {:<24}  {:>4}  {:<8}  {}",
                        t.id,
                        t.name,
                        t.active_keys,
                        state,
                        t.created_at.to_rfc3339()
                    );
                }
                if !more {
                    break;
                }
            }
        }
        TenantCommand::Show { tenant, json } => tenant_or_json(admin.tenant(&tenant).await?, json),
        TenantCommand::Rename {
            tenant,
            new_name,
            json,
        } => {
            let update = TenantUpdate {
                name: Some(new_name),
                ..Default::default()
            };
            tenant_or_json(admin.update_tenant(&tenant, update).await?, json)
        }
        TenantCommand::SetLimits {
            tenant,
            limits,
            json,
        } => {
            let update = TenantUpdate {
                limits: limits.patch(),
                ..Default::default()
            };
            tenant_or_json(admin.update_tenant(&tenant, update).await?, json)
        }
        TenantCommand::SetBudgets {
            tenant,
            budgets,
            json,
        } => {
            let update = TenantUpdate {
                budgets: budgets.patch(),
                ..Default::default()
            };
            tenant_or_json(admin.update_tenant(&tenant, update).await?, json)
        }
        TenantCommand::Disable { tenant, json } => {
            tenant_or_json(admin.set_disabled(&tenant, true).await?, json)
        }
        TenantCommand::Enable { tenant, json } => {
            tenant_or_json(admin.set_disabled(&tenant, false).await?, json)
        }
        TenantCommand::Delete { tenant, yes } => {
            if !yes {
                bail!(
                    "deleting tenant {tenant:?} removes all its keys, chats, messages and usage \
                     for good; add --yes to confirm"
                );
            }
            let t = admin.delete_tenant(&tenant).await?;
            println!("tenant {} ({}) deleted with all its data", t.name, t.id);
        }
    }
    Ok(())
}

fn created_key(k: KeyInfo, secret: String, json: bool) {
    if json {
        print_json(&CreatedKeyDto {
            key: k.into(),
            api_key: secret,
        });
    } else {
        println!("key {} created; shown only this once:", k.prefix);
        println!("{secret}");
    }
}

fn revoked_key(k: KeyInfo, json: bool) {
    if json {
        print_json(&KeyDto::from(k));
    } else {
        match k.tenant_id {
            Some(t) => println!("revoked key {} of tenant {t}", k.prefix),
            None => println!("revoked admin key {}", k.prefix),
        }
    }
}

pub async fn key(admin: &Admin, cmd: KeyCommand) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::Create { tenant, spec, json } => {
            let (k, key) = admin.create_key(&tenant, &spec.spec()).await?;
            created_key(k, key.secret, json);
        }
        KeyCommand::List { tenant, json } => keys_or_json(admin.list_keys(&tenant).await?, json),
        KeyCommand::Revoke { key, tenant, json } => {
            revoked_key(admin.revoke_key(tenant.as_deref(), &key).await?, json)
        }
    }
    Ok(())
}

pub async fn admin(admin: &Admin, cmd: AdminCommand) -> anyhow::Result<()> {
    let cmd = match cmd {
        AdminCommand::Key(cmd) => cmd,
        AdminCommand::Usage {
            tenant,
            from,
            to,
            group_by,
            json,
        } => return usage(admin, tenant.as_deref(), from, to, group_by, json).await,
        AdminCommand::Audit {
            tenant,
            action,
            since,
            until,
            offset,
            limit,
            json,
        } => {
            let actions = action
                .as_deref()
                .map(AuditAction::matching)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--action: {e}"))?;
            let filter = AuditFilter {
                tenant: None,
                actions,
                since,
                until,
            };
            let page = PageRequest {
                offset,
                limit,
                order: Order::Desc,
            };
            let p = admin.audit(tenant.as_deref(), filter, page).await?;
            if json {
                print_json(&AuditPageDto::from(p));
            } else {
                print_audit(&p);
            }
            return Ok(());
        }
    };
    match cmd {
        AdminKeyCommand::Create { spec, json } => {
            let (k, key) = admin.create_admin_key(&spec.spec()).await?;
            created_key(k, key.secret, json);
        }
        AdminKeyCommand::List { json } => keys_or_json(admin.list_admin_keys().await?, json),
        AdminKeyCommand::Revoke { key, json } => {
            revoked_key(admin.revoke_admin_key(&key).await?, json)
        }
    }
    Ok(())
}

async fn usage(
    admin: &Admin,
    tenant: Option<&str>,
    from: Option<chrono::NaiveDate>,
    to: Option<chrono::NaiveDate>,
    group_by: UsageGroupArg,
    json: bool,
) -> anyhow::Result<()> {
    let (from, to) = crate::domain::usage_range(from, to, Utc::now().date_naive())
        .map_err(|e| anyhow::anyhow!("--from/--to: {e}"))?;
    let group = match group_by {
        UsageGroupArg::Tenant => UsageGroupDto::Tenant,
        UsageGroupArg::User => UsageGroupDto::User,
        UsageGroupArg::Key => UsageGroupDto::Key,
        UsageGroupArg::Day => UsageGroupDto::Day,
    };
    let rows = admin.usage(tenant, from, to, group.into()).await?;
    if json {
        print_json(&AdminUsageDto {
            from,
            to,
            group_by: group,
            rows: rows.into_iter().map(Into::into).collect(),
        });
        return Ok(());
    }
    println!("usage {from} to {to}");
    println!(
        "{:<24}  {:<36}  {:>12}  {:>12}  {:>8}",
        "tenant", "user / key / day", "prompt", "completion", "replies"
    );
    for (r, name) in rows {
        let what = r
            .user_id
            .clone()
            .or(r.key_id.map(|k| k.to_string()))
            .or(r.day.map(|d| d.to_string()))
            .unwrap_or_default();
        println!(
            "{:<24}  {:<36}  {:>12}  {:>12}  {:>8}",
            name.unwrap_or_else(|| format!("(deleted) {}", r.tenant_id)),
            what,
            r.prompt_tokens,
            r.completion_tokens,
            r.replies
        );
    }
    Ok(())
}

fn print_audit(p: &Page<AuditEntry>) {
    println!(
        "{:<19}  {:<16}  {:<24}  {:<20}  details",
        "at (UTC)", "action", "actor", "tenant"
    );
    for e in &p.items {
        let actor = match &e.actor_id {
            Some(id) => format!("{}:{id}", e.actor),
            None => e.actor.clone(),
        };
        let mut details = serde_json::Map::new();
        if let Some(t) = &e.target {
            details.insert("target".into(), t.clone().into());
        }
        details.extend(e.details.clone());
        println!(
            "{:<19}  {:<16}  {:<24}  {:<20}  {}",
            when(Some(e.at)),
            e.action,
            actor,
            e.tenant_name.as_deref().unwrap_or("-"),
            serde_json::Value::Object(details)
        );
    }
    println!(
        "({} of {} records{})",
        p.items.len(),
        p.total,
        if p.has_more() {
            "; more with --offset"
        } else {
            ""
        }
    );
}
