//! The host's balloon requests on a VM (`impl Host`): target, size,
//! statistics, polling interval and counters.

use super::{BalloonDevice, BalloonInfo, BalloonReport, BalloonStatistics, Error as BalloonError};
use crate::host::{Error, Host};

impl Host {
    /// The balloon of VM `id`.
    pub fn balloon(&self, id: &str) -> Result<&BalloonDevice, Error> {
        self.vm(id)?.balloon().ok_or_else(|| BalloonError::NoBalloon(id.to_string()).into())
    }

    /// Sets the balloon target of VM `id` to `amount_mib` (at most its RAM) and
    /// tells the guest's driver.
    pub fn set_balloon_target(&self, id: &str, amount_mib: u32) -> Result<(), Error> {
        let vm = self.vm(id)?;
        let balloon = vm.balloon().ok_or_else(|| BalloonError::NoBalloon(id.to_string()))?;
        if u64::from(amount_mib) > vm.spec().mem_mib {
            return Err(BalloonError::TooLarge { amount_mib, mem_mib: vm.spec().mem_mib }.into());
        }
        balloon.set_target_mib(amount_mib);
        Ok(())
    }

    /// Settings, target and actual size of VM `id`'s balloon.
    pub fn balloon_info(&self, id: &str) -> Result<BalloonInfo, Error> {
        Ok(self.balloon(id)?.info())
    }

    /// The latest guest statistics of VM `id`'s balloon.
    pub fn balloon_statistics(&self, id: &str) -> Result<BalloonStatistics, Error> {
        Ok(self.balloon(id)?.statistics())
    }

    /// Changes the statistics polling interval of VM `id`'s balloon (created
    /// with statistics; 0 is refused).
    pub fn set_balloon_stats_interval(&self, id: &str, seconds: u16) -> Result<(), Error> {
        Ok(self.balloon(id)?.set_stats_polling_interval(seconds)?)
    }

    /// The counters of VM `id`'s balloon.
    pub fn balloon_report(&self, id: &str) -> Result<BalloonReport, Error> {
        Ok(self.balloon(id)?.report())
    }
}
