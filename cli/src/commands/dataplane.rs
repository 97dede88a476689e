//! `dataplane list`.

use sluice_proto::v1 as pb;

use crate::args::DataplaneCommand;
use crate::connection::Connection;
use crate::error::Error;
use crate::render::{self, Output};

pub async fn run(
    command: DataplaneCommand,
    connection: &Connection,
    out: &Output,
) -> Result<(), Error> {
    match command {
        DataplaneCommand::List => {
            let mut admin = connection.admin().await?;
            let response = connection
                .call(admin.list_data_planes(pb::ListDataPlanesRequest {}))
                .await?;
            out.print(&response, render::data_planes)
        }
    }
}
