"""Every figure: functions that take results and return matplotlib Figures."""
