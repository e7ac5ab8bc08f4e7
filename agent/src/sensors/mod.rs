//! hwmon temperatures from sysfs; no privilege needed, so no helper involved. (Issue 3.)
