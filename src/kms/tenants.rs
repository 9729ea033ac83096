//! Tenants: creation, lookup by name (cached), destruction now or after a window, and
//! forgetting a destroyed tenant's cached keys on every node.

use crate::ids::{Name, TenantId};
use crate::keystore::TenantRecord;

use super::Kms;
use super::error::Error;

impl Kms {
    /// Creates a tenant with a new random id.
    ///
    /// # Errors
    /// [`crate::keystore::Error::AlreadyExists`] if the name is taken.
    pub fn create_tenant(&self, name: &Name) -> Result<TenantRecord, Error> {
        Ok(self.store.create_tenant(name)?)
    }

    /// The tenant with this name.
    ///
    /// # Errors
    /// [`Error::TenantNotFound`].
    pub fn tenant(&self, name: &Name) -> Result<TenantRecord, Error> {
        self.store
            .tenant_by_name(name)?
            .ok_or_else(|| Error::TenantNotFound(name.clone()))
    }

    /// The id of the tenant with this name, from memory when it was looked up before.
    ///
    /// # Errors
    /// [`Error::TenantNotFound`].
    pub fn tenant_id(&self, name: &Name) -> Result<TenantId, Error> {
        self.trusted_or_loaded(|| self.tenant_ids.get(name), || self.load_tenant_id(name))
    }

    pub(super) fn load_tenant_id(&self, name: &Name) -> Result<TenantId, Error> {
        let epoch = self.epoch();
        let record = self.tenant(name)?;
        if let Some(at) = record.destroy_at {
            return Err(Error::KeyState {
                reason: "TENANT_DESTROY_SCHEDULED",
                message: format!(
                    "tenant {name} is scheduled for destruction at {at} (seconds since the epoch); an officer can cancel it with CancelTenantDestruction"
                ),
            });
        }
        let current = self.cache_epoch.read().expect("cache epoch lock poisoned");
        if *current == epoch {
            self.tenant_ids.insert(name.clone(), record.id);
        }
        Ok(record.id)
    }

    /// Destroys a tenant at once (crypto-shredding): tombstone, then its database is erased.
    ///
    /// # Errors
    /// [`crate::keystore::Error::TenantNotFound`].
    pub fn destroy_tenant(&self, tenant: TenantId) -> Result<(), Error> {
        self.store.destroy_tenant(tenant)?;
        self.forget_tenant(tenant);
        self.await_propagation();
        Ok(())
    }

    /// Schedules a tenant's destruction after the default pending window (never below the
    /// minimum, the backup retention). The tenant is refused at once; until the window ends,
    /// [`Kms::cancel_tenant_destruction`] restores it. Then the scheduler crypto-shreds it:
    /// tombstone, records removed, database directory deleted.
    ///
    /// # Errors
    /// [`Error::TenantNotFound`].
    pub fn schedule_tenant_destruction(&self, name: &Name) -> Result<TenantRecord, Error> {
        let id = self.tenant(name)?.id;
        let window = self.destruction_window.max(self.min_destruction_window);
        let at = self.clock.now_secs().saturating_add(window.as_secs());
        let record = self.store.schedule_tenant_destruction(id, at)?;
        crate::failpoint::hit("destroy-tenant:scheduled");
        self.forget_tenant(id);
        self.await_propagation();
        Ok(record)
    }

    /// Restores a tenant scheduled for destruction.
    ///
    /// # Errors
    /// [`Error::TenantNotFound`]; NOT_SCHEDULED if it is not scheduled.
    pub fn cancel_tenant_destruction(&self, name: &Name) -> Result<TenantRecord, Error> {
        let id = self.tenant(name)?.id;
        let record = self.store.cancel_tenant_destruction(id)?;
        self.forget_tenant(id);
        Ok(record)
    }

    /// Returns once no node can decide from a view older than the commit just made: on a
    /// shared store, after the change feed's bound (a node whose feed was confirmed since the
    /// commit has applied it; one not confirmed within the bound reads the store). Called by
    /// the changes that must be refused everywhere before they are acknowledged: disable,
    /// destruction, minimum decryption version, tenant destruction. Runs on a blocking thread.
    pub(super) fn await_propagation(&self) {
        if let Some(changes) = self.store.changes() {
            std::thread::sleep(changes.bound());
        }
    }

    /// Drops everything of a tenant from memory (under the cache epoch, so no reader puts it
    /// back from an older read).
    pub(super) fn forget_tenant(&self, tenant: TenantId) {
        let mut epoch = self.cache_epoch.write().expect("cache epoch lock poisoned");
        *epoch += 1;
        self.tenant_ids.retain(|_, id| *id != tenant);
        self.primaries
            .write()
            .expect("primaries lock poisoned")
            .remove(&tenant);
        self.versions
            .write()
            .expect("versions lock poisoned")
            .remove(&tenant);
        self.bulk_keys.retain(|(id, _, _), _| *id != tenant);
        self.usage
            .write()
            .expect("usage lock poisoned")
            .retain(|(id, _, _), _| *id != tenant);
    }
}
